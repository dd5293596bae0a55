"""Prompt optimization and candidate selection (`lightning-ray optimize CONFIG`).

`search` (beam search of critique-and-rewrite steps) and `halving` (successive halving) are the algorithms;
`editor` asks the critic and editor model; `scoring` runs candidates on the rollout stack; `run` is the command.
"""
