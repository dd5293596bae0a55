"""What `lightning-ray check` verifies beyond the YAML's own fields: that a run could start with it.

It reads every dataset split (rows and fields), imports the agent, renders the chat template on a sample
conversation (with a tool, as the gateway would), and builds the tool-call parser on the model's tokenizer and
parses a sample answer. Each check reports one line; every problem names the config field and the file, and
all of them are reported together (`PreflightError`), not one per run of the command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_ray.config import Config, ConfigError, resolve_path

SAMPLE_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}
SAMPLE_MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 12 * 7?"},
]


class PreflightError(ConfigError):
    """Everything that would stop a run with this config, one line per problem."""


def preflight(cfg: Config) -> list[str]:
    """Run every check; returns what each found (`data.train: ... 200 rows ...`), or raises `PreflightError`
    listing every problem."""
    base = Path(cfg.source).parent if cfg.source else Path.cwd()
    found: list[str] = []
    problems: list[str] = []

    def run(field: str, check: Callable[[], Any]) -> Any:
        try:
            result, line = check()
        except Exception as err:  # noqa: BLE001 - every failure is reported, named by its field
            problems.append(f"{field}: {err}")
            return None
        found.append(f"{field}: {line}")
        return result

    run("data.train", lambda: _dataset(cfg.data.train, base))
    if cfg.data.val:
        run("data.val", lambda: _dataset(cfg.data.val, base))
    run("rollout.agent", lambda: _agent(cfg.rollout.agent))
    tokenizer = run("model.path", lambda: _tokenizer(cfg.model.path))
    if tokenizer is not None:
        field = "model.chat_template" if cfg.model.chat_template else "model.path (chat template)"
        run(field, lambda: _chat_template(cfg, tokenizer, base))
        run("model.tool_parser", lambda: _tool_parser(cfg, tokenizer))
    if problems:
        raise PreflightError(f"config {cfg.source or '(inline)'} cannot run:\n  " + "\n  ".join(problems))
    return found


def _dataset(path: str, base: Path) -> tuple[Any, str]:
    from lightning_ray.tasks.dataset import load_tasks

    resolved = resolve_path(path, base)
    tasks = load_tasks(resolved)  # DatasetError names the file and the line or row
    fields = sorted({key for task in tasks for key in task.data})
    return tasks, f"{resolved}: {len(tasks)} rows, fields {', '.join(fields)}"


def _agent(spec: str) -> tuple[Any, str]:
    """Import the agent as a rollout worker would: the working directory is on its path."""
    from lightning_ray.agent.api import AgentLoadError, load_agent

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        agent = load_agent(spec)
    except AgentLoadError:
        raise
    except Exception as err:  # the module raised while importing
        raise AgentLoadError(f"agent {spec!r}: importing it raised {type(err).__name__}: {err}") from err
    return agent, f"{spec} imports (agent {agent.name!r})"


def _tokenizer(path: str) -> tuple[Any, str]:
    """The model's tokenizer (a builtin model's alone, without converting its weights)."""
    from lightning_ray.gateway.render import load_tokenizer
    from lightning_ray.models import builtin_tokenizer_dir

    try:
        builtin = path.startswith("builtin:")
        folder = builtin_tokenizer_dir(path.removeprefix("builtin:")) if builtin else Path(path).expanduser()
        tokenizer = load_tokenizer(folder)
    except Exception as err:
        raise ValueError(f"{path}: cannot load its tokenizer: {type(err).__name__}: {err}") from err
    return tokenizer, f"{path}: tokenizer loads ({len(tokenizer)} tokens)"


def _chat_template(cfg: Config, tokenizer: Any, base: Path) -> tuple[None, str]:
    """Render the sample as the gateway does: plain, and with a tool offered (the tools template)."""
    from lightning_ray.gateway.protocol import ChatCompletionRequest
    from lightning_ray.gateway.render import load_chat_template, render_chat
    from lightning_ray.gateway.tools import template_for

    where = cfg.model.chat_template or f"{cfg.model.path}'s tokenizer"
    configured = None
    if cfg.model.chat_template:
        configured = load_chat_template(resolve_path(cfg.model.chat_template, base))
    lengths = []
    for tools in (None, [SAMPLE_TOOL]):
        req = ChatCompletionRequest.model_validate({"messages": SAMPLE_MESSAGES, "tools": tools})
        try:
            text = render_chat(tokenizer, SAMPLE_MESSAGES, template_for(tokenizer, configured, req), tools)
        except Exception as err:  # noqa: BLE001 - a Jinja error, a missing template
            with_tools = " with a tool" if tools else ""
            raise ValueError(f"{where}: rendering a sample conversation{with_tools} failed: {err}") from err
        lengths.append(len(text))
    return None, f"{where} renders a sample ({lengths[0]} characters, {lengths[1]} with a tool)"


def _tool_parser(cfg: Config, tokenizer: Any) -> tuple[None, str]:
    """vLLM's parser by the configured name, built on this tokenizer, reading a sample answer."""
    from lightning_ray.gateway.protocol import ChatCompletionRequest
    from lightning_ray.gateway.tools import DEFAULT_TOOL_PARSER, tool_call_parser

    name = cfg.model.tool_parser or DEFAULT_TOOL_PARSER
    req = ChatCompletionRequest.model_validate({"messages": SAMPLE_MESSAGES, "tools": [SAMPLE_TOOL]})
    parser = tool_call_parser(name, tokenizer, req)  # ValueError naming the parser and the known ones
    reply = parser.parse("12 * 7 = 84.")
    return None, f"{name!r} parses a sample answer (content {reply.content!r})"
