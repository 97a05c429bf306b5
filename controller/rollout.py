"""Multi-turn rollouts, as the controller drives them: model turns on the sampler mesh,
environment turns and tool calls on the host, until every row is done.

    reset(row) -> prompt ─▶ TurnSampler.turn ─▶ text ─▶ tool calls? ─yes─▶ reward backend ─▶
        tool messages ─┐        └─no─▶ env.step(text) ─▶ observation, done, info ─┐
                       └──────────── chat template ─▶ observation ids ◀──────────┘ ─▶ next turn

One `MultiTurn` serves a job (`env.*`): the environment class and its tools, the chat format of
the job's tokenizer (controller/data/chat.py) and a `TurnSampler` on the sampler's weights. Per
step, `begin(rows)` builds an environment per row and renders its first messages (the prompt),
and `run` plays the turns:

1. A model turn for every live row, each at most sampling.max_new_tokens and what is left of
   T = env.max_total_tokens (one program; rows that are done are not sampled, and the turn
   ends when the last live row stops).
2. For each row, its text: tool calls (`Environment.parse_tool_calls`) are checked against the
   offered tools' schemas on the host, then every row's valid calls run in one batch on the
   reward backend (worker processes with rewards.timeout_s), and each call's answer, or its
   error, becomes a tool message. A turn without calls goes to `env.step`.
3. The observation's ids (the chat template's text after the model's turn) join the row,
   unless the row is done, out of turns, or out of tokens.

Each finished row is packed into the trainer's layout (sampler/multiturn.py): the completion
holds model and observation tokens (all attended); only model tokens carry loss and a
behaviour logprob. A failure of the environment's own code (reset excepted) ends that row and
is counted (`env/step_errors`); a tool's failure is the model's to read (`env/tool_errors/*`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from controller.config import ConfigError, JobConfig
from controller.data.chat import ChatState, build_chat_format
from controller.data.hf_tokenizer import HFTokenizer
from controller.data.tokenizer import Tokenizer
from rewards.base import Outcome, RewardError
from rewards.environments import Environment, Trajectory, load_environment, offered_tools
from rewards.registry import RewardSet, build_tool_backend
from rewards.tools import TOOL_ERROR_KINDS, ParsedCall, Tool, ToolCall, check_arguments
from sampler.jax_sampler import JaxSampler
from sampler.multiturn import PackedTurns, TurnSampler, pack_turns, pad_prompts_left

# Per-step counts: summed over dynamic-sampling rounds (everything else under env/ averages).
SUMMED_METRICS = ("env/tool_calls", "env/tool_errors", "env/masked_tokens", "env/model_tokens",
                  "env/step_errors", "env/template_fallbacks", "env/reprefills", "time/env_s")
ENDINGS = ("done", "max_turns", "max_total_tokens", "cut", "template", "error")


@dataclass
class _Row:
    """One row's rollout state."""

    env: Environment
    chat: ChatState
    traj: Trajectory
    segments: list[tuple[list[int], list[float] | None]] = field(default_factory=list)
    used: int = 0  # tokens after the prompt
    live: bool = True
    errors: dict[str, int] = field(default_factory=dict)  # tool error kind -> count


@dataclass
class Started:
    """What `MultiTurn.begin` returns: the rows' prompts and their per-row state."""

    rows: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    prompt_BxP: np.ndarray
    pmask_BxP: np.ndarray
    group: int
    state: list[_Row]
    env_s: float


@dataclass
class Finished:
    """A step's multi-turn rows, packed, with what the rewards and the metrics need."""

    rows: list[dict[str, Any]]  # the dataset rows, each with its "trajectory" (messages)
    prompt_BxP: np.ndarray
    pmask_BxP: np.ndarray
    packed: PackedTurns
    truncated_B: np.ndarray  # ended out of tokens, or on a turn cut without a stop
    final_texts: list[str]  # each row's last model turn: what the reward functions score
    env_scores_B: np.ndarray  # Environment.score (0 where it gave none)
    env_scored: bool  # any row's environment gave a score
    records: list[dict[str, Any]]  # per row: turns, tool calls, errors, ending, conversation
    metrics: dict[str, float]


class MultiTurn:
    """Multi-turn rollouts for a job with `env.name` set (see the module docstring)."""

    def __init__(self, cfg: JobConfig, tokenizer: Tokenizer, sampler: Any, rewards: RewardSet,
                 *, turns: Any = None):
        """`turns`: what plays the model's turns; default a `TurnSampler` on `sampler` (tests
        pass a scripted policy with the same methods)."""
        env = cfg.env
        assert env.name is not None
        if turns is None and not isinstance(sampler, JaxSampler):
            raise ConfigError("env.name: multi-turn rollouts need the JAX sampler (fix: "
                              "sampling.backend=jax)")
        try:
            self.env_cls = load_environment(env.name)
            self.tools: list[tuple[str, Tool]] = offered_tools(env.name, env.tools)
        except RewardError as e:
            raise ConfigError(str(e)) from None
        self.kwargs = dict(env.kwargs)
        try:  # the arguments are checked once here rather than per row in every step
            self.env_cls(**self.kwargs)
        except Exception as e:
            raise ConfigError(f"env.kwargs={self.kwargs}: {self.env_cls.__name__}(**env.kwargs) "
                              f"failed: {type(e).__name__}: {e} (fix: give the arguments its "
                              f"__init__ takes)") from None
        self.by_name = {t.name: (source, t) for source, t in self.tools}
        self.tokenizer = tokenizer
        self.chat = build_chat_format(tokenizer, [t.schema() for _, t in self.tools] or None)
        env_stops = []
        for text in self.env_cls.stop_strings:
            ids = tokenizer.encode(text, bos=False)
            if len(ids) != 1:
                raise ConfigError(f"env.name={env.name!r}: its stop string {text!r} is {len(ids)} "
                                  f"tokens of the tokenizer, not one (fix: a stop string that "
                                  f"is one token)")
            env_stops.append(ids[0])
        self.stop_ids = tuple(dict.fromkeys(
            (*tokenizer.stop_ids, *cfg.sampling.stop_tokens, *env_stops)))
        self.max_turns = env.max_turns
        self.total = cfg.completion_tokens
        self.n_new = cfg.sampling.max_new_tokens
        self.turns = turns or TurnSampler(sampler, stop_ids=self.stop_ids,
                                          max_new_tokens=self.n_new, total_tokens=self.total,
                                          history=env.history)
        self.pad_id = tokenizer.pad_id
        self.bucket = cfg.sampling.prompt_bucket
        # Where tool calls run (no workers are started for an environment without tools).
        self.tool_backend, self._owns_backend = (
            build_tool_backend(cfg.rewards, rewards) if self.tools else (None, False))

    def close(self) -> None:
        if self._owns_backend:
            self.tool_backend.close()
            self._owns_backend = False

    def metrics(self) -> dict[str, float]:
        return {"sampler/turn_compiles": float(self.turns.traces)}

    # -- a step -----------------------------------------------------------------------------

    def begin(self, rows: list[dict[str, Any]], group: int) -> Started:
        """An environment per row, reset; the prompts its first messages render to. The G rows
        of a group must get the same first messages (GRPO compares G answers to one prompt)."""
        t0 = time.perf_counter()
        state, prompts = [], []
        for row in rows:
            env = self.env_cls(**self.kwargs)
            messages = env.reset(row)  # the environment's bug if it raises: not contained
            ids, chat = self.chat.start(messages)
            prompts.append(ids)
            state.append(_Row(env, chat, Trajectory(row, chat.messages, 0)))
        if group > 1:
            for start in range(0, len(prompts), group):
                if any(p != prompts[start] for p in prompts[start:start + group]):
                    raise ValueError(
                        f"env.name: {self.env_cls.__name__}.reset gave the rows of one group "
                        f"different first messages (row {start}); GRPO compares "
                        f"sampling.group_size answers to one prompt (fix: make reset a "
                        f"function of the row alone)")
        prompt_BxP, pmask_BxP = pad_prompts_left(prompts, self.pad_id, self.bucket)
        return Started(rows, prompts, prompt_BxP, pmask_BxP, group, state,
                       time.perf_counter() - t0)

    def run(self, started: Started, key: Any) -> Finished:
        """Plays every row's turns (see the module docstring); returns them packed."""
        rows, state = started.rows, started.state
        env_s = started.env_s
        steps = decode = reprefills = 0
        self.turns.start(started.prompt_ids, group=started.group)
        try:
            for turn in range(self.max_turns):
                # MODEL TURN: one program for every live row (HOST SYNC inside: the ids).
                live = [r.live for r in state]
                budget = [max(1, min(self.n_new, self.total - r.used)) for r in state]
                out = self.turns.turn(live, budget, jax.random.fold_in(key, turn))
                decode += out.decode_steps
                reprefills += out.reprefilled
                steps += 1
                # ENVIRONMENT TURN: tools and env.step on the host.
                t0 = time.perf_counter()
                self._answer(state, out.ids, out.logps, last=turn == self.max_turns - 1)
                env_s += time.perf_counter() - t0
                if not any(r.live for r in state):
                    break
        finally:
            self.turns.finish()
        t0 = time.perf_counter()
        scores = np.zeros(len(rows), np.float32)
        scored = False
        for i, r in enumerate(state):
            r.traj.tool_errors = sum(r.errors.values())
            try:
                s = r.env.score(r.traj)
            except Exception:
                s = None
                r.errors["score"] = r.errors.get("score", 0) + 1
            if s is not None:
                scored = True
                scores[i] = sum(s.values()) if isinstance(s, dict) else float(s)
        env_s += time.perf_counter() - t0
        packed = pack_turns([r.segments for r in state], self.total, self.pad_id)
        return Finished(
            rows=[{**row, "trajectory": r.traj.messages} for row, r in zip(rows, state,
                                                                           strict=True)],
            prompt_BxP=started.prompt_BxP, pmask_BxP=started.pmask_BxP, packed=packed,
            truncated_B=np.asarray([r.traj.ended in ("cut", "max_total_tokens") for r in state]),
            final_texts=[self._answer_of(r) for r in state], env_scores_B=scores,
            env_scored=scored, records=[self._record(r) for r in state],
            metrics=self._metrics(state, packed, env_s, steps, decode, reprefills))

    # -- the environment's turn ---------------------------------------------------------------

    def _answer(self, state: list[_Row], ids: list[list[int]], logps: list[list[float]], *,
                last: bool) -> None:
        """Records each live row's model turn, then answers it: tool calls (all rows' in one
        batch on the reward backend), else env.step; appends the observations."""
        replies: dict[int, list[dict[str, Any] | None]] = {}  # row -> a message per call
        pending: list[tuple[int, int, ToolCall]] = []  # (row, index in replies, call)
        steps: dict[int, tuple[list[dict[str, Any]] | None, bool]] = {}
        for i, r in enumerate(state):
            if not r.live:
                continue
            drawn = ids[i]
            r.segments.append((drawn, logps[i]))
            r.used += len(drawn)
            r.traj.turns += 1
            text = self.chat.add_turn(r.chat, drawn)
            if not drawn or drawn[-1] not in self.stop_ids:  # no stop: the turn was cut
                self._end(r, "max_total_tokens" if r.used >= self.total else "cut")
                continue
            try:
                calls = r.env.parse_tool_calls(text)
            except Exception:
                self._count(r, "step_error")
                self._end(r, "error")
                continue
            if calls and last:  # out of turns: nobody would read the answers, so none run
                r.traj.tool_calls += len(calls)
                self._end(r, "max_turns")
                continue
            if calls:
                replies[i] = []
                for call in calls:
                    message = self._check_call(r, call)
                    replies[i].append(message)
                    if message is None:
                        source, _ = self.by_name[call.name]  # type: ignore[index]
                        pending.append((i, len(replies[i]) - 1,
                                        ToolCall(source, call.name, dict(call.arguments),
                                                 r.traj.row)))
                continue
            try:
                observation, done, info = r.env.step(text)
            except Exception:
                self._count(r, "step_error")
                self._end(r, "error")
                continue
            info = dict(info or {})
            r.traj.infos.append(info)
            if info.get("reward") is not None:
                r.traj.turn_rewards.append(float(info["reward"]))
            steps[i] = (observation, bool(done))
        # TOOLS: every row's valid calls at once, on the reward backend (timeouts there).
        outcomes = self.tool_backend.run([c for _, _, c in pending]) if pending else []
        for (i, j, call), outcome in zip(pending, outcomes, strict=True):
            replies[i][j] = self._tool_reply(state[i], call.name, outcome)
        for i, r in enumerate(state):
            if not r.live:
                continue
            if i in replies:
                observation, done = replies[i], False
            else:
                observation, done = steps[i]
            if done or last:
                self._end(r, "done" if done else "max_turns")
                continue
            if not observation:
                self._end(r, "done")
                continue
            obs_ids = self.chat.observe(r.chat, observation)
            if obs_ids is None:
                self._end(r, "template")
            elif r.used + len(obs_ids) + 1 > self.total:  # no room for the model to answer
                self._end(r, "max_total_tokens")
            else:
                r.segments.append((obs_ids, None))
                r.used += len(obs_ids)
                self.turns.observe(i, obs_ids)

    def _check_call(self, r: _Row, call: ParsedCall) -> dict[str, Any] | None:
        """The error message for a call that cannot run (malformed, unknown tool, bad
        arguments), counted; None for a call to run."""
        r.traj.tool_calls += 1
        if call.error is not None:
            return self._error(r, call.name, "malformed", call.error)
        if call.name not in self.by_name:
            return self._error(r, call.name, "unknown_tool",
                               f"there is no tool {call.name!r}; the tools are "
                               f"{sorted(self.by_name)}")
        why = check_arguments(self.by_name[call.name][1].parameters, dict(call.arguments))
        if why is not None:
            return self._error(r, call.name, "bad_arguments", why)
        return None

    def _tool_reply(self, r: _Row, name: str, outcome: Outcome) -> dict[str, Any]:
        if outcome.kind == "ok":
            return r.env.tool_message(name, str(outcome.value))
        kind = outcome.kind if outcome.kind in TOOL_ERROR_KINDS else "error"
        detail = outcome.detail.strip().splitlines()[-1] if outcome.detail.strip() else kind
        return self._error(r, name, kind, detail)

    def _error(self, r: _Row, name: str | None, kind: str, detail: str) -> dict[str, Any]:
        r.errors[kind] = r.errors.get(kind, 0) + 1
        return r.env.tool_message(name or "", r.env.error_text(name, kind, detail), error=kind)

    def _answer_of(self, r: _Row) -> str:
        """What the reward functions score: `Environment.answer` (the last turn by default)."""
        try:
            return str(r.env.answer(r.traj))
        except Exception:
            self._count(r, "step_error")
            return r.traj.final_text

    @staticmethod
    def _count(r: _Row, what: str) -> None:
        r.errors[what] = r.errors.get(what, 0) + 1

    @staticmethod
    def _end(r: _Row, why: str) -> None:
        r.live = False
        r.traj.ended = why

    # -- results ------------------------------------------------------------------------------

    def _record(self, r: _Row) -> dict[str, Any]:
        text = (self.tokenizer.decode_all if isinstance(self.tokenizer, HFTokenizer)
                else self.tokenizer.decode)
        return {
            "turns": r.traj.turns,
            "tool_calls": r.traj.tool_calls,
            "tool_errors": {k: v for k, v in r.errors.items() if k in TOOL_ERROR_KINDS},
            "ended": r.traj.ended,
            "transcript": "".join(text(ids) for ids, _ in r.segments),
            "conversation": r.traj.messages,
        }

    def _metrics(self, state: list[_Row], packed: PackedTurns, env_s: float, steps: int,
                 decode: int, reprefills: int) -> dict[str, float]:
        n = max(len(state), 1)
        turns = np.asarray([r.traj.turns for r in state], np.float32)
        m = {
            "env/turns_mean": float(turns.mean()),
            "env/turns_max": float(turns.max()),
            "env/tool_calls": float(sum(r.traj.tool_calls for r in state)),
            "env/tool_errors": float(sum(r.errors.get(k, 0) for r in state
                                         for k in TOOL_ERROR_KINDS)),
            "env/step_errors": float(sum(r.errors.get("step_error", 0) + r.errors.get("score", 0)
                                         for r in state)),
            "env/model_tokens": float(packed.model_mask_BxT.sum()),
            # Observation tokens: attended by the trainer, but no loss and no logprob.
            "env/masked_tokens": float((packed.mask_BxT & ~packed.model_mask_BxT).sum()),
            "env/template_fallbacks": float(sum(r.chat.fallbacks for r in state)),
            "env/rounds": float(steps),
            "env/decode_steps": float(decode),
            "env/reprefills": float(reprefills),
            "time/env_s": env_s,
        }
        for kind in TOOL_ERROR_KINDS:
            m[f"env/tool_errors/{kind}"] = float(sum(r.errors.get(kind, 0) for r in state))
        for why in ENDINGS:
            m[f"env/ended/{why}_frac"] = sum(r.traj.ended == why for r in state) / n
        return m
