"""Agent environments: MiniGrid / BabyAI (text and image observations, the scripted expert,
mission families) and TextWorld (generated games, scores, walkthroughs); episode GIFs."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from geode.agents.envs.minigrid import (
    ACTIONS,
    FAMILIES,
    MiniGridEnv,
    expert_action,
    mission_family,
    parse_action,
)
from geode.agents.envs.textworld import TextWorldEnv, expert_command, make_games, pick_command
from tests.agents.test_judge import TINY, one_thread  # noqa: F401  (one torch thread)

TW = {"nb_rooms": 2, "nb_objects": 3, "quest_length": 3}  # small games: ~2 s each to compile


@pytest.fixture(scope="session")
def tw_games(tmp_path_factory):
    """Two training games and one held-out game, compiled once per session."""
    out = tmp_path_factory.mktemp("tw")
    return make_games(2, 0, out, **TW), make_games(1, 0, out, split="heldout", **TW), out


def _play(env, policy) -> float:
    """One episode of `policy(env) -> text`; the summed reward."""
    env.reset()
    total, done = 0.0, False
    while not done:
        _, r, done = env.step(policy(env))
        total += r
    return total


# ------------------------------------------------------------------------------ MiniGrid
@pytest.mark.parametrize(
    "family", ["goto-obj-s4", "goto-local", "pickup", "open", "empty", "doorkey"]
)
def test_expert_solves_heldout_episodes_with_minigrid_reward(family):
    for env_id, seed in mission_family(family, "heldout", 4):
        env = MiniGridEnv(env_id, seed, max_turns=64)
        total = _play(env, expert_action)
        u = env.unwrapped
        assert env.info["success"], (env_id, seed, env.info)
        assert env.info["steps"] == u.step_count and env.info["invalid_actions"] == 0
        assert total == pytest.approx(1 - 0.9 * u.step_count / u.max_steps)  # MiniGrid's reward


def test_random_policy_mostly_fails_where_the_expert_succeeds():
    rng = random.Random(0)
    episodes = mission_family("goto-obj", "heldout", 30)
    wins = sum(_play(MiniGridEnv(i, s), lambda e: rng.choice(ACTIONS)) > 0 for i, s in episodes)
    assert wins <= 0.3 * len(episodes)
    assert all(_play(MiniGridEnv(i, s), expert_action) > 0 for i, s in episodes)


def test_text_observation_places_objects_where_they_are():
    """Each "X: a ahead b left/right" of the text is at agent + a * forward + b * right."""
    checked = 0
    for env_id, seed in mission_family("pickup", "train", 6):
        env = MiniGridEnv(env_id, seed)
        text = env.reset()[0]["content"]
        assert text == MiniGridEnv(env_id, seed).reset()[0]["content"]  # deterministic
        assert text.startswith(f"Mission: {env.mission}\n") and "Actions: left, right" in text
        u = env.unwrapped
        seen = re.search(r"You see: (.*)", text).group(1)
        for item in seen.split("; "):
            m = re.fullmatch(r"(\w+) (\w+)(?: (\d+) ahead)?(?: (\d+) (left|right))?", item)
            color, kind = m.group(1), m.group(2)
            ahead, side = (
                int(m.group(3) or 0),
                int(m.group(4) or 0) * (-1 if m.group(5) == "left" else 1),
            )
            x, y = np.asarray(u.agent_pos) + ahead * u.dir_vec + side * u.right_vec
            obj = u.grid.get(int(x), int(y))
            assert (obj.color, obj.type) == (color, kind), (item, text)
            checked += 1
    assert checked >= 6


def test_image_observation_and_frames():
    env_id, seed = mission_family("goto-obj-s4", "heldout", 1)[0]
    env = MiniGridEnv(env_id, seed, observation="image")
    first = env.reset()[0]
    image, text = first["content"]
    assert image["type"] == "image" and text["type"] == "text"
    assert np.array_equal(np.asarray(image["image"]), env.unwrapped.get_frame(tile_size=16))
    assert "You see" not in text["text"] and env.mission in text["text"]
    done = False
    while not done:
        _, r, done = env.step(expert_action(env))
    frames = env.frames()
    assert env.info["success"] and len(frames) == env.info["steps"] + 1
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[-1])
    both = MiniGridEnv(env_id, seed, observation="both").reset()[0]["content"]
    assert both[0]["type"] == "image" and "You see" in both[1]["text"]
    text, recorded = MiniGridEnv(env_id, seed), MiniGridEnv(env_id, seed, record=True)
    _play(text, expert_action), _play(recorded, expert_action)
    assert text.frames() == []  # text episodes keep no frames unless recorded
    assert all(np.array_equal(a, b) for a, b in zip(recorded.frames(), frames, strict=True))


def test_invalid_actions_are_counted_no_ops():
    env = MiniGridEnv("BabyAI-GoToObj-v0", 5, max_turns=3, invalid_penalty=0.1)
    env.reset()
    pos, d = tuple(env.unwrapped.agent_pos), env.unwrapped.agent_dir
    msgs, r, done = env.step("I am not sure what to do")
    assert r == pytest.approx(-0.1) and not done and env.info["invalid_actions"] == 1
    assert msgs[0]["content"].startswith("Invalid action.")
    assert (tuple(env.unwrapped.agent_pos), env.unwrapped.agent_dir) == (pos, d)
    assert env.unwrapped.step_count == 0
    env.step("Turn LEFT now")
    assert env.unwrapped.agent_dir == (d - 1) % 4 and env.info["invalid_actions"] == 1
    _, _, done = env.step("?")
    assert done and env.info == {**env.info, "steps": 3, "invalid_actions": 2, "success": False}
    with pytest.raises(RuntimeError, match="without a running episode"):
        env.step("left")


def test_parse_action_is_lenient():
    assert parse_action("forward") == "forward"
    assert parse_action("I will pick up the key, then go forward") == "pickup"
    assert parse_action("Action: Toggle.") == "toggle"
    assert parse_action("leftover") is None and parse_action("") is None


def test_mission_families_split_seeds():
    for name in FAMILIES:
        train, held = mission_family(name, "train", 200), mission_family(name, "heldout", 200)
        assert len(train) == len(held) == 200
        assert not {s for _, s in train} & {s for _, s in held}
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        mission_family("nope", "train", 1)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        mission_family("goto-obj", "test", 1)


def test_bad_env_id_and_a_crashing_step_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="BabyAI-Nope-v0"):
        MiniGridEnv("BabyAI-Nope-v0")
    with pytest.raises(ValueError, match="CartPole-v1"):
        MiniGridEnv("CartPole-v1")
    env = MiniGridEnv("BabyAI-GoToObjS4-v0", 1)
    match = r"MiniGridEnv BabyAI-GoToObjS4-v0 \(seed 1\).*IndexError"
    _crash_step(monkeypatch, env, lambda: env.gym, IndexError("grid index"), "forward", match)


def _crash_step(monkeypatch, env, library, error: Exception, action: str, match: str) -> None:
    """A library exception inside env.step comes out as a RuntimeError naming the env."""

    def boom(*args):
        raise error

    env.reset()
    monkeypatch.setattr(library(), "step", boom)
    with pytest.raises(RuntimeError, match=match):
        env.step(action)


def test_spawned_copies_run_their_own_episodes():
    env = MiniGridEnv("BabyAI-GoToObjS4-v0", 7)
    a, b = env.spawn(), env.spawn()
    assert a.reset() == b.reset()
    a.step("left")
    assert a.unwrapped is not b.unwrapped and b.unwrapped.step_count == 0
    assert a.meta == {"env_id": "BabyAI-GoToObjS4-v0", "seed": 7}


# ------------------------------------------------------------------------------- GIFs
def test_episode_frames_become_a_readable_gif(tmp_path):
    from PIL import Image

    from geode.agents.frames import save_gif

    env = MiniGridEnv("BabyAI-GoToObj-v0", 3, observation="image")
    _play(env, expert_action)
    frames = env.frames()
    path = save_gif(frames, tmp_path / "episode.gif", fps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["episode.gif"]  # no temporaries left
    with Image.open(path) as gif:
        assert gif.n_frames == len(frames) and gif.size == frames[0].shape[1::-1]
        assert gif.info["duration"] == 200
        for i in (0, len(frames) - 1):
            gif.seek(i)
            got = np.asarray(gif.convert("RGB"), dtype=np.int16)
            assert np.abs(got - frames[i]).mean() < 2.0  # the palette of a few flat colours
    with pytest.raises(ValueError, match="no frames"):
        save_gif([], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="frame 1 is"):
        save_gif([frames[0], frames[0][:8]], tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"frame 0 must be \(H, W, 3\) uint8"):
        save_gif([frames[0].astype(np.float32)], tmp_path / "x.gif")
    assert not (tmp_path / "x.gif").exists()


# ------------------------------------------------------------------------------ TextWorld
def test_textworld_walkthrough_wins_with_normalised_score(tw_games):
    train, held, _ = tw_games
    for path in [*train, *held]:
        env = TextWorldEnv(path)
        first = env.reset()[0]["content"]
        assert "Commands: " in first and "-= " in first  # the objective, the room, the commands
        rewards, done, msgs = [], False, None
        walk = env.walkthrough()
        for command in walk:
            assert not done
            msgs, r, done = env.step(f"I think I should {command.upper()} now.")  # lenient
            rewards.append(r)
            if not done:
                assert msgs[0]["content"].splitlines()[-1].startswith("Commands: ")
        assert done and msgs is None and sum(rewards) == pytest.approx(1.0)
        assert env.info["success"] and env.info["score"] == env.info["max_score"] >= 1
        assert env.info["steps"] == len(walk)
        with pytest.raises(RuntimeError, match="without a running episode"):
            env.step("look")
        env.close()


def test_textworld_expert_recovers_and_random_mostly_fails(tw_games):
    train, held, _ = tw_games
    env = TextWorldEnv(held[0])
    env.reset()
    msgs, r, done = env.step("xyzzy")
    assert r == 0.0 and not done and "not a verb" in msgs[0]["content"]
    env.step("inventory")
    while not env.done:
        env.step(expert_command(env))
    assert env.info["success"] and env.info["steps"] == len(env.walkthrough()) + 2
    rng, wins, n = random.Random(0), 0, 0
    for path in train:
        for _ in range(4):
            env = TextWorldEnv(path, max_turns=4)
            env.reset()
            while not env.done:
                env.step(rng.choice(env.state.admissible_commands))
            wins, n = wins + env.info["success"], n + 1
        env.close()
    assert wins <= n // 4


def test_make_games_caches_and_splits_by_seed(tw_games):
    train, held, out = tw_games
    stamps = [p.stat().st_mtime_ns for p in train]
    assert make_games(2, 0, out, **TW) == train  # reused, not recompiled
    assert [p.stat().st_mtime_ns for p in train] == stamps
    assert [p.name.rsplit("-", 1)[1] for p in [*train, *held]] == ["0.z8", "1.z8", "1000000.z8"]
    assert all(p.with_suffix(".json").is_file() for p in [*train, *held])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert len({TextWorldEnv(p).walkthrough().__repr__() for p in [*train, *held]}) == 3
    other = make_games(0, 0, out, nb_rooms=3, nb_objects=3, quest_length=3)
    assert other == []
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_games(1, 0, out, split="dev")


def test_textworld_bad_inputs_are_clear_errors(tw_games, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no game file .*missing.z8"):
        TextWorldEnv(tmp_path / "missing.z8")
    env = TextWorldEnv(tw_games[0][0])
    match = r"TextWorldEnv tw-\w+-0.z8: step 'look' failed: OSError: interpreter died"
    _crash_step(monkeypatch, env, lambda: env.game, OSError("interpreter died"), "look", match)


def test_pick_command_is_lenient():
    cmds = ["go south", "take teaspoon", "take teaspoon from shelf", "look"]
    assert (
        pick_command("Let me take teaspoon from shelf, then go south", cmds)
        == "take teaspoon from shelf"
    )
    assert pick_command("GO SOUTH!", cmds) == "go south"
    assert pick_command('"open the door."\nmore', cmds) == "open the door"


# ------------------------------------------------------------- end to end on the engine
def _transcript(env, policy) -> list[dict]:
    """The chat messages of one episode played directly (a tokenizer corpus)."""
    msgs, done = env.reset(), False
    while not done:
        action = policy(env)
        new, _, done = env.step(action)
        msgs += [{"role": "assistant", "content": action}, *(new or [])]
    return msgs


@pytest.fixture(scope="module")
def engine(tw_games, tmp_path_factory):
    """A random tiny model on a tokenizer trained on MiniGrid and TextWorld transcripts."""
    import geode
    from geode.chat import render
    from geode.infer import Engine
    from geode.tokenizer import train_tokenizer

    texts = [render(_transcript(MiniGridEnv(i, s), expert_action), add_generation_prompt=False)
             for i, s in mission_family("goto-obj", "train", 20)]  # fmt: skip
    for path in tw_games[0]:
        texts.append(
            render(_transcript(TextWorldEnv(path), expert_command), add_generation_prompt=False)
        )
    tok = train_tokenizer(
        texts=texts, vocab_size=500, out=tmp_path_factory.mktemp("tok"), num_threads=1
    )
    cfg = geode.get_preset("nano-1m").replace(
        **{**TINY, "vocab_size": len(tok), "max_position_embeddings": 4096}
    )
    return Engine(geode.build_model(cfg, seed=0).eval(), tok, max_batch=4, optimize=False, seed=0)


def _scripted(engine, env, script: list[str]):
    """One episode of `env` through rollout (run_agent) with the model forced to `script`."""
    from geode.agents.loop import ScriptedPolicy, run_agent

    policy = ScriptedPolicy(engine.tokenizer, script)
    return run_agent(engine, [env], sampling=policy.sampling(max_new_tokens=16))[0]


def _expert_script(env, policy) -> list[str]:
    """The expert's actions on a copy of `env` (episodes are deterministic per seed)."""
    return [m["content"] for m in _transcript(env.spawn(), policy) if m["role"] == "assistant"]


@pytest.mark.parametrize("observation", ["text", "image"])
def test_scripted_expert_solves_minigrid_through_rollout(engine, observation):
    for env_id, seed in mission_family("goto-obj", "heldout", 2):
        env = MiniGridEnv(env_id, seed, observation=observation)
        script = _expert_script(env, expert_action)
        res = _scripted(engine, env, script)
        ep = res.episode
        assert res.success and res.info["error"] is None and res.info["steps"] == len(script)
        assert [
            engine.tokenizer.decode(ep.token_ids[a:b], skip_special=True) for a, b in ep.turns
        ] == script
        assert res.reward == pytest.approx(1 - 0.9 * len(script) / 64)  # an 8x8 room: 64 steps
        assert ep.meta["env_id"] == env_id and ep.meta["seed"] == seed
        observations = [m for m in ep.messages if m["role"] == "user"]
        assert len(observations) == len(script)  # the first + one after each non-final action
        if observation == "image":
            assert all(m["content"][0]["type"] == "image" for m in observations)
    # a random script mostly fails on the same missions
    rng = random.Random(1)
    fails = 0
    for env_id, seed in mission_family("goto-obj", "heldout", 4):
        res = _scripted(
            engine, MiniGridEnv(env_id, seed, max_turns=8), [rng.choice(ACTIONS) for _ in range(8)]
        )
        fails += not res.success
    assert fails >= 3


def test_scripted_walkthrough_wins_textworld_through_rollout(engine, tw_games):
    env = TextWorldEnv(tw_games[1][0])
    script = _expert_script(env, expert_command)
    res = _scripted(engine, env, script)
    assert script == env.walkthrough()
    assert res.success and res.reward == pytest.approx(1.0) and res.info["steps"] == len(script)
    assert res.episode.messages[0]["content"].startswith(env.reset()[0]["content"][:40])
    # a crashing game ends its episode as a counted failure, named
    broken = TextWorldEnv(tw_games[1][0])
    broken.spawn = lambda: _Crashing(tw_games[1][0])
    res = _scripted(engine, broken, script)
    assert not res.success and "interpreter died" in res.info["error"]


class _Crashing(TextWorldEnv):
    def step(self, message):
        raise RuntimeError(f"TextWorldEnv {self.game_path.name}: step failed: interpreter died")
