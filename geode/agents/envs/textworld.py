"""TextWorld games as agent environments (procedurally generated text games with scores;
issue #21, item 2).

    paths = make_games(8, seed=0, out_dir="games", split="train")   # compiled once, cached
    env = TextWorldEnv(paths[0], max_turns=20)
    messages = env.reset()        # the objective, the room, the admissible commands
    messages, reward, done = env.step("take teaspoon from shelf")

`make_games` generates games with `textworld.generator.make_game` and compiles them with
`compile_game` (a few seconds each). A game is a file `tw-<options hash>-<seed>.z8` (+ its
`.json`) in `out_dir`: the hash covers the generation options and TextWorld's version, so an
existing game is reused and a changed option makes new files. Splits by seed: "train" games
have seeds seed, seed + 1, ...; "heldout" games 1_000_000 + seed, ... (disjoint).

An episode: reset -> one user message (the objective, the room's description, "Commands: "
and the admissible commands); step(command) -> the game's feedback and the new admissible
commands; reward = the score's increase / the game's max score (an episode that wins sums
to 1); done on a win, a loss or `max_turns` commands. The model's text is lenient: the
admissible command that occurs first in it (the longest at one position) is played, else its
first line. `info`: "success" (won), "steps", "score", "max_score", "lost".
`walkthrough()` is the game's winning command list; `expert_command(env)` the next command of
TextWorld's winning policy from the current state (it recovers after detours).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from geode.agents.base import AgentEnv

SPLITS = {"train": 0, "heldout": 1_000_000}  # the first game seed of each split


def _options_key(nb_rooms: int, nb_objects: int, quest_length: int, theme: str) -> str:
    import textworld

    spec = {"rooms": nb_rooms, "objects": nb_objects, "quest_length": quest_length,
            "theme": theme, "textworld": textworld.__version__}  # fmt: skip
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def make_games(
    n: int,
    seed: int,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    nb_rooms: int = 2,
    nb_objects: int = 4,
    quest_length: int = 3,
    theme: str = "house",
) -> list[Path]:
    """`n` compiled games (.z8 paths) of the split, generated with the options or reused from
    `out_dir` (module doc)."""
    if split not in SPLITS:
        raise ValueError(f"make_games: unknown split {split!r} (expected one of {list(SPLITS)})")
    if n < 0 or seed < 0 or seed + n > SPLITS["heldout"]:
        raise ValueError(
            f"make_games: need 0 <= n, 0 <= seed, seed + n <= {SPLITS['heldout']}; got n={n}, seed={seed}"
        )
    for name, v in (
        ("nb_rooms", nb_rooms),
        ("nb_objects", nb_objects),
        ("quest_length", quest_length),
    ):
        if v < 1:
            raise ValueError(f"make_games: {name} must be >= 1, got {v}")
    out = Path(out_dir)
    key = _options_key(nb_rooms, nb_objects, quest_length, theme)
    paths = []
    for i in range(n):
        s = SPLITS[split] + seed + i
        path = out / f"tw-{key}-{s}.z8"
        if not path.with_suffix(".json").is_file():
            _compile(path, s, nb_rooms, nb_objects, quest_length, theme)
        paths.append(path)
    return paths


def _compile(
    path: Path, seed: int, nb_rooms: int, nb_objects: int, quest_length: int, theme: str
) -> None:
    """Generate and compile one game into a temporary folder beside `path`, then move the
    .z8 and (last: it marks the game complete) the .json into place."""
    from textworld import GameOptions
    from textworld.generator import compile_game, make_game
    from textworld.generator.chaining import QuestGenerationError

    opts = GameOptions()
    opts.seeds = seed
    opts.nb_rooms, opts.nb_objects, opts.quest_length = nb_rooms, nb_objects, quest_length
    opts.grammar.theme = theme
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tw-"))
    try:
        opts.path = str(tmp / path.name)
        opts.force_recompile = True
        try:
            game = make_game(opts)
        except QuestGenerationError as e:
            raise ValueError(f"make_games: no quest for seed {seed} with rooms={nb_rooms}, "
                             f"objects={nb_objects}, quest_length={quest_length}: {e}") from e  # fmt: skip
        compiled = Path(compile_game(game, opts))
        os.replace(compiled, path)
        os.replace(compiled.with_suffix(".json"), path.with_suffix(".json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clean_feedback(text: str) -> str:
    """The game's text without the prompt / status line, the end banner and blank runs."""
    text = (text or "").split("\n>", 1)[0].split("*** The End ***", 1)[0]
    return re.sub(r"\n\s*\n+", "\n", text).strip()


def pick_command(text: str, admissible: list[str]) -> str:
    """The admissible command that occurs first in `text` (the longest at one position), else
    its first non-empty line without quotes / trailing punctuation."""
    low = (text or "").lower()
    hits = [(m.start(), -len(c), c) for c in admissible
            for m in [re.search(rf"(?<!\w){re.escape(c.lower())}(?!\w)", low)] if m]  # fmt: skip
    if hits:
        return min(hits)[2]
    line = next((ln.strip() for ln in low.splitlines() if ln.strip()), "")
    return line.strip("\"'`*").rstrip(".!")


@contextmanager
def _quiet():
    """Silence jericho's warning that it cannot list a TextWorld game's actions (TextWorld's
    own wrapper gives the admissible commands)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unable to find valid actions")
        yield


class TextWorldEnv(AgentEnv):
    """A TextWorld game as an agent env (module doc)."""

    def __init__(
        self,
        game_path: str | os.PathLike,
        *,
        max_turns: int = 20,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        path = Path(game_path)
        if not path.is_file():
            raise ValueError(f"TextWorldEnv: no game file {str(path)!r}")
        if max_turns < 1:
            raise ValueError(f"TextWorldEnv: max_turns must be >= 1, got {max_turns}")
        self.game_path, self.max_turns = path, int(max_turns)
        self.meta = {"game": path.name, **(meta or {})}
        self.game: Any = None  # the textworld environment, started at the first reset
        self.state: Any = None  # the last textworld GameState
        self.done = False

    def spawn(self) -> TextWorldEnv:
        """A new env on the same game (its own interpreter)."""
        return TextWorldEnv(self.game_path, max_turns=self.max_turns, meta=self.meta)

    def walkthrough(self) -> list[str]:
        """The game's winning commands from the start."""
        from textworld import Game

        return list(Game.load(str(self.game_path.with_suffix(".json"))).walkthrough)

    def reset(self) -> list[dict[str, Any]]:
        """A new episode: the objective, the room and the admissible commands."""
        import textworld

        try:
            with _quiet():
                if self.game is None:
                    infos = textworld.EnvInfos(admissible_commands=True, objective=True, description=True,
                                               max_score=True, score=True, won=True, lost=True,
                                               policy_commands=True)  # fmt: skip
                    self.game = textworld.start(str(self.game_path), request_infos=infos)
                self.state = self.game.reset()
        except Exception as e:
            raise RuntimeError(
                f"TextWorldEnv {self.game_path.name}: reset failed: {type(e).__name__}: {e}"
            ) from e
        s = self.state
        self.info = {**self.info, "success": False, "steps": 0, "tool_calls": 0, "error": None,
                     "score": 0, "max_score": int(s.max_score), "lost": False}  # fmt: skip
        self.done = False
        text = f"{s.objective.strip()}\n{clean_feedback(s.description)}\n{self._commands()}"
        return [{"role": "user", "content": text}]

    def step(self, message: str) -> tuple[list[dict[str, Any]] | None, float, bool]:
        """Play the command in the model's message (module doc)."""
        if self.state is None or self.done:
            raise RuntimeError(
                f"TextWorldEnv {self.game_path.name}: step() without a running episode (reset first)"
            )
        command = pick_command(message, list(self.state.admissible_commands or []))
        before = self.state.score
        try:
            with _quiet():
                self.state, _, _ = self.game.step(command)
        except Exception as e:
            raise RuntimeError(
                f"TextWorldEnv {self.game_path.name}: step {command!r} failed: {type(e).__name__}: {e}"
            ) from e
        s = self.state
        turns = self.info["steps"] + 1
        self.info = {**self.info, "steps": turns, "score": int(s.score), "success": bool(s.won),
                     "lost": bool(s.lost)}  # fmt: skip
        reward = (s.score - before) / max(1, s.max_score)
        self.done = bool(s.won or s.lost) or turns >= self.max_turns
        if self.done:
            return None, float(reward), True
        text = f"{clean_feedback(s.feedback) or '(nothing happens)'}\n{self._commands()}"
        return [{"role": "user", "content": text}], float(reward), False

    def close(self) -> None:
        """Stop the game's interpreter."""
        if self.game is not None:
            self.game.close()
            self.game, self.state = None, None

    def _commands(self) -> str:
        return "Commands: " + ", ".join(self.state.admissible_commands or [])


def expert_command(env: TextWorldEnv) -> str:
    """The next command of TextWorld's winning policy from the env's current state."""
    if env.state is None or env.done:
        raise RuntimeError(f"expert_command: no running {env.game_path.name} episode")
    policy = env.state.policy_commands
    if not policy:
        raise ValueError(
            f"expert_command: {env.game_path.name} has no winning policy from this state"
        )
    return policy[0]
