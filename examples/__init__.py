"""Example agents, one folder each; every one is trained by a config in configs/."""
