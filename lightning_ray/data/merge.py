"""Shape a trajectory table for training: whose calls train (multi-agent), and prefix-extending turns merged.

Both take and return Arrow tables with the columns of `TRANSITION_SCHEMA` (one row per LLM call).

`select_trained_calls(table, train_agents)` keeps the calls of the roles in `rollout.train_agents` (all when
it is None). Roles come from the gateway route (`llm.for_agent("checker")`) or the model name an agent passes.

Credit per role: every kept call is credited with its rollout's reward (the value the agent returned, or the
sum of its `emit_reward`s), unless the agent emitted a reward for that very call (`call_reward`), which then
counts for it. Advantages are per rollout within its GRPO group, so every trained role of a rollout shares the
rollout's advantage. Call this after `compute_advantages` when agents emit per-call rewards, so that a rollout's
value still includes the rewards emitted on calls of untrained roles; with returned rewards the order does not
matter.

`merge_prefix_turns(table)` (config `algorithm.merge_prefix_turns`) turns a run of consecutive calls of one
rollout and one agent, where each call's prompt starts with the previous call's prompt + response (a chat that
only grows: tool results and user turns appended), into one training sequence. Calls whose history was
rewritten or summarised do not extend a prefix and stay their own (prompt, response) pair. A merged row has:

- `prompt_ids`: the first call's prompt;
- `response_ids`: everything after it up to the end of the last call's response: generated tokens of every
  call and, between them, the tokens the agent inserted (tool results, user turns, template markup);
- `loss_mask` (list<int8>, same length as `response_ids`): 1 where the policy generated the token, 0 where it
  was inserted. Train only where it is 1;
- `response_logprobs`: the sampling log-prob of each generated token, 0.0 at inserted tokens (mask them out);
- `response_versions`: the policy version of each generated token; an inserted token takes the version the
  call after it started on (the first call to read it), so the list stays aligned with `response_ids`;
- `merged_calls` (int32): how many calls the row holds (1 for rows left alone);
- `call_index`, identity columns, `reward`, `model`, `endpoint`, `started_at`: from the first call;
  `finish_reason`: the last call's; `latency_s`: the sum; `policy_version`: the oldest of the calls;
  `call_reward`: the sum of the calls' emitted rewards (null if none emitted); `response_text`: the calls'
  response texts joined with "\n".

Every row of the output has `loss_mask` and `merged_calls`, so the learner reads one layout either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_ray.data.schema import MERGED_SCHEMA, TRANSITION_SCHEMA, list_column


def select_trained_calls(table: pa.Table, train_agents: Sequence[str] | None) -> pa.Table:
    """The rows whose `agent` is one of `train_agents`; the whole table when `train_agents` is None."""
    if train_agents is None:
        return table
    if len(train_agents) == 0:
        raise ValueError("rollout.train_agents is empty: no call would be trained (leave it unset for all)")
    keep = pc.is_in(table.column("agent"), value_set=pa.array(list(train_agents), pa.string()))
    return table.filter(keep)


class _Lists:
    """A list<number> column as flat numpy values + offsets: row i is values[offsets[i]:offsets[i + 1]]."""

    def __init__(self, table: pa.Table, name: str, dtype: type):
        values, lengths = list_column(table, name)
        self.values = values.astype(dtype, copy=False)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


def extends(prompts: _Lists, responses: _Lists, prev: int, nxt: int) -> bool:
    """Whether row `nxt`'s prompt starts with row `prev`'s prompt + response."""
    n_prompt, n_resp = prompts.length(prev), responses.length(prev)
    head = prompts.row(nxt)
    if len(head) < n_prompt + n_resp:
        return False
    return np.array_equal(head[:n_prompt], prompts.row(prev)) and np.array_equal(
        head[n_prompt : n_prompt + n_resp], responses.row(prev)
    )


def prefix_chains(table: pa.Table) -> list[list[int]]:
    """Row indices of `table` (sorted by rollout, call index) grouped into runs that extend a prefix."""
    prompts = _Lists(table, "prompt_ids", np.int64)
    responses = _Lists(table, "response_ids", np.int64)
    rollout = table.column("rollout_id").to_pylist()
    agent = table.column("agent").to_pylist()
    chains: list[list[int]] = []
    for i in range(table.num_rows):
        prev = chains[-1][-1] if chains else None
        same_owner = prev is not None and rollout[prev] == rollout[i] and agent[prev] == agent[i]
        if same_owner and extends(prompts, responses, prev, i):
            chains[-1].append(i)
        else:
            chains.append([i])
    return chains


def merge_prefix_turns(table: pa.Table) -> pa.Table:
    """One row per run of prefix-extending calls (see the module doc); `MERGED_SCHEMA` columns."""
    table = table.sort_by([("rollout_id", "ascending"), ("call_index", "ascending")])
    chains = prefix_chains(table)
    calls = _Calls(table)
    sequences = [_merge_chain(chain, calls) for chain in chains]
    firsts = table.take(pa.array([c[0] for c in chains], pa.int64()))
    lasts = table.take(pa.array([c[-1] for c in chains], pa.int64()))
    columns = {name: firsts.column(name) for name in TRANSITION_SCHEMA.names}
    columns["response_ids"] = _list_array([s[0] for s in sequences], pa.int32())
    columns["response_logprobs"] = _list_array([s[1] for s in sequences], pa.float32())
    columns["response_versions"] = _list_array([s[2] for s in sequences], pa.int64())
    columns["finish_reason"] = lasts.column("finish_reason")
    columns.update(_chain_scalars(table, chains))
    columns["loss_mask"] = _list_array([s[3] for s in sequences], pa.int8())
    columns["merged_calls"] = pa.array([len(c) for c in chains], pa.int32())
    return pa.table(columns, schema=MERGED_SCHEMA)


class _Calls:
    """What a merge reads of each call: its token lists and the version it started on."""

    def __init__(self, table: pa.Table):
        self.prompts = _Lists(table, "prompt_ids", np.int32)
        self.responses = _Lists(table, "response_ids", np.int32)
        self.logprobs = _Lists(table, "response_logprobs", np.float32)
        self.versions = _Lists(table, "response_versions", np.int64)
        self.started_on = table.column("policy_version").to_numpy()


def _merge_chain(chain: list[int], calls: _Calls) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(response ids, log-probs, versions, loss mask) of one run, relative to its first prompt."""
    prompts, responses = calls.prompts, calls.responses
    start, last = prompts.length(chain[0]), chain[-1]
    ids = np.concatenate([prompts.row(last)[start:], responses.row(last)])
    lps = np.zeros(len(ids), np.float32)
    versions = np.zeros(len(ids), np.int64)
    mask = np.zeros(len(ids), np.int8)
    end = 0  # where the previous call's response ended: inserted tokens lie between it and this call's
    for row in chain:
        at, n = prompts.length(row) - start, responses.length(row)
        versions[end:at] = calls.started_on[row]
        lps[at : at + n] = calls.logprobs.row(row)
        versions[at : at + n] = calls.versions.row(row)
        mask[at : at + n] = 1
        end = at + n
    return ids, lps, versions, mask


def _chain_scalars(table: pa.Table, chains: list[list[int]]) -> dict[str, pa.Array]:
    """Per-run aggregates: latency sum, oldest policy version, emitted reward sum, joined texts."""
    latency = np.nan_to_num(table.column("latency_s").to_numpy(zero_copy_only=False).astype(np.float64))
    version = table.column("policy_version").to_numpy()
    call_reward = table.column("call_reward").to_pylist()
    texts = table.column("response_text").to_pylist()
    emitted = [[call_reward[i] for i in c if call_reward[i] is not None] for c in chains]
    return {
        "latency_s": pa.array([float(latency[c].sum()) for c in chains], pa.float64()),
        "policy_version": pa.array([int(version[c].min()) for c in chains], pa.int64()),
        "call_reward": pa.array([sum(e) if e else None for e in emitted], pa.float64()),
        "response_text": pa.array(["\n".join(texts[i] or "" for i in c) for c in chains], pa.string()),
    }


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((len(r) for r in rows), np.int32, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))
