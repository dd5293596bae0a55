"""A multi-turn calculator agent on the plain OpenAI SDK with a safe arithmetic tool (see README.md).

The agent itself lives in ``examples.calc.agent:calc_agent``; this package import stays free of
lightning_ray and openai so the pure parts (tool, reward, prompt, protocol, dataset) load anywhere.
"""
