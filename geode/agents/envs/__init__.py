"""Agent environments behind geode.post.env's interface (reset / step), from maintained
libraries: MiniGrid (geode.agents.envs.minigrid) and TextWorld (geode.agents.envs.textworld)."""
