"""geode: build, train, post-train, serve and evaluate a family of Gemma-style models."""
