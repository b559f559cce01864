"""Agents (issue #21): tool use and plan-act-verify loops on the engine, environments
(MiniGrid, TextWorld, the project's code and math tasks), agentic RL, judges and
self-improvement. Modules are imported by name (geode.agents.tools, .loop, .envs, .rl,
.judge, .selfimprove); docs/agents.md describes them."""
