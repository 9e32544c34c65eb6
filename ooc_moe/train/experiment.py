"""The comparison the package exists for: MoE (token / env / cohort routing, and token routing
under the other balance modes) vs dense, over seeds, with CleanRL's plain CNN agent (``cnn``)
as the anchor of what PPO learns in the same budget.

``run_experiment`` trains one run per (kind, seed) into ``OUT/<kind>-seed<seed>/`` with the
same games, schedule, evaluation and active parameters, then writes ``OUT/summary.json``. A
run whose ``metrics.json`` says it finished is read back, not retrained; one with a checkpoint
is resumed: calling it again after an interruption finishes the experiment.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import stats

from ..envs.synthetic import NUM_ACTIONS
from ..scores import aggregate_scores, run_kind
from .checkpoint import find_checkpoint
from .run import TrainArgs, action_masks, args_from_json, args_to_json, train

__all__ = ["RUN_KINDS", "run_experiment", "summarize", "format_summary", "format_verdict",
           "load_results", "paired_changes", "half_width_95", "early_learning",
           "learning_table", "format_learning_table", "cache_table", "format_cache_table",
           "format_forgetting_table"]

RUN_KINDS = {"token": {"baseline": "moe", "routing": "token"},
             "env": {"baseline": "moe", "routing": "env"},
             "cohort": {"baseline": "moe", "routing": "cohort"},
             "token-none": {"baseline": "moe", "routing": "token", "balance": "none"},
             "token-horizon": {"baseline": "moe", "routing": "token", "balance": "horizon"},
             "dense": {"baseline": "dense", "routing": "token"},
             "cnn": {"baseline": "cnn", "routing": "token"}}


def run_experiment(base: TrainArgs, kinds: Sequence[str], seeds: Sequence[int],
                   out: str | Path, *, progress: bool = True, command: str | None = None,
                   jobs: int = 1) -> dict:
    """Train (or resume, or read back) every ``kind`` x ``seed``; returns the summary.

    ``jobs > 1`` trains that many runs at once, each in its own process with one torch
    thread (a 2-core machine runs two); each run prints one line when it ends instead of a
    progress bar. Several machines sharing ``out`` may run the same call: a finished run is
    read back, but two machines must not train the same run at the same time.
    """
    unknown = [k for k in kinds if k not in RUN_KINDS]
    if unknown or not kinds:
        raise ValueError(f"runs must be among {', '.join(RUN_KINDS)}, got {list(kinds)}")
    if not seeds:
        raise ValueError("give at least one seed")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    for kind in kinds:                   # every configuration checked before any training
        replace(base, **RUN_KINDS[kind]).agent_config()
    out = Path(out)
    runs = [replace(base, **RUN_KINDS[kind], seed=seed, out=str(out / f"{kind}-seed{seed}"))
            for kind in kinds for seed in seeds]
    for args in runs:            # a run already there is read back or resumed: the same one?
        differ = _saved_differences(args)
        if differ:
            raise ValueError(f"{args.out} holds a run of another configuration ("
                             f"{'; '.join(differ)}): give another --out, or the same flags")
    todo = [args for args in runs if not _finished(Path(args.out))]
    if jobs == 1 or len(todo) < 2:
        for args in todo:
            _train_run(args, progress, command)
    else:
        _train_in_processes(todo, jobs, command)
    results = load_results(out)
    summary = summarize({name: results[name] for kind in kinds for seed in seeds
                         if (name := f"{kind}-seed{seed}") in results})
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def _train_run(args: TrainArgs, progress: bool, command: str | None) -> float:
    """Train (or resume) one run of the experiment; its seconds."""
    started = time.perf_counter()
    agent = train(args, progress, resume=find_checkpoint(args.out) is not None,
                  command=command)["agent"]
    if agent.store is not None:
        agent.store.shutdown()             # its pools go now, not when the process ends
    return time.perf_counter() - started


def _train_in_process(args: TrainArgs, command: str | None) -> float:
    """``_train_run`` in a worker process: one torch thread, no progress bar."""
    torch.set_num_threads(1)
    return _train_run(args, False, command)


def _train_in_processes(todo: Sequence[TrainArgs], jobs: int, command: str | None) -> None:
    """Every run of ``todo``, ``jobs`` at a time in fresh processes (spawned, so no thread
    or file of this process is inherited); the first failure cancels the runs not started
    and is raised once the running ones end (they keep their checkpoints)."""
    context = multiprocessing.get_context("spawn")
    print(f"{len(todo)} runs, {jobs} at a time (one process and torch thread each)",
          flush=True)
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_train_in_process, args, command): Path(args.out).name
                   for args in todo}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                seconds = future.result()
                print(f"  [{done}/{len(todo)}] {futures[future]} finished in "
                      f"{seconds / 60:.1f} min", flush=True)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# settings a run may change when it is resumed, or that only say where it runs
_RESUMABLE = ("out", "device", "checkpoint_every")


def _saved_differences(args: TrainArgs) -> list[str]:
    """``"name: saved -> wanted"`` for every setting in which the run saved in ``args.out``
    (its ``metrics.json``, written with each checkpoint) differs from ``args``; none when
    nothing is saved there."""
    path = Path(args.out) / "metrics.json"
    if not path.is_file():
        return []
    saved = args_from_json(json.loads(path.read_text())["args"])   # older: defaults filled
    flat = {}
    for which, d in (("saved", args_to_json(saved)), ("wanted", args_to_json(args))):
        d = json.loads(json.dumps(d))
        for group in ("ppo", "eval"):
            d.update({f"{group}.{k}": v for k, v in d.pop(group).items()})
        flat[which] = d
    return [f"{k}: {flat['saved'][k]!r} -> {v!r}" for k, v in flat["wanted"].items()
            if k not in _RESUMABLE and flat["saved"].get(k) != v]


def _finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.json"
    return path.is_file() and json.loads(path.read_text()).get("finished", False)


def load_results(out: str | Path) -> dict[str, dict]:
    """Every finished run's ``metrics.json`` under ``out``, by run name."""
    runs = {p.parent.name: json.loads(p.read_text())
            for p in sorted(Path(out).glob("*/metrics.json"))}
    return {name: metrics for name, metrics in runs.items() if metrics.get("finished")}


def half_width_95(samples: np.ndarray) -> np.ndarray:
    """95% half-width of the mean over the last axis (Student's t interval,
    ``scipy.stats.t``); NaN with one sample."""
    k = samples.shape[-1]
    if k < 2:
        return np.full(samples.shape[:-1], np.nan)
    return stats.t.ppf(0.975, k - 1) * samples.std(-1, ddof=1) / math.sqrt(k)


def paired_changes(metrics: dict) -> tuple[np.ndarray, np.ndarray]:
    """Episode by episode (every evaluation replays the same seeded starts), each game's rise
    during its own stage and its forgetting by the end: two ``[N, episodes]`` arrays whose
    means are the run's rise and forgetting."""
    returns = np.array(metrics["eval_returns"], dtype=np.float64)     # [1 + N, N, episodes]
    n = returns.shape[1]
    own = returns[1 + np.arange(n), np.arange(n)]                       # [N, episodes]
    return own - returns[0], own - returns[n]


def summarize(results: Mapping[str, dict]) -> dict:
    """Per kind of run, over its seeds: mean retention matrix, forgetting (mean, min, max),
    each game's rise during its own stage, the noise of both (95% half-widths: over seeds
    when there are several, else over the evaluation's paired episodes), average final
    human-normalised score (mean, min, max; ``aggregate``: IQM and mean over runs x games with
    rliable's stratified-bootstrap intervals), store figures, SPS."""
    by_kind: dict[str, list[dict]] = {}
    for name, metrics in results.items():
        by_kind.setdefault(run_kind(name), []).append(metrics)
    summary = {}
    for kind, runs in by_kind.items():
        forgetting = np.array([m["forgetting"] for m in runs])
        finals = [m["average_final_score"] for m in runs]
        s = {"seeds": [m["args"]["seed"] for m in runs], "games": runs[0]["games"],
             "initial": np.mean([m["initial"] for m in runs], 0).tolist(),
             "retention": np.mean([m["retention"] for m in runs], 0).tolist(),
             "forgetting": forgetting.mean(0).tolist(),
             "forgetting_min": forgetting.min(0).tolist(),
             "forgetting_max": forgetting.max(0).tolist(),
             "average_final_score": float(np.mean(finals)),
             "average_final_score_min": float(np.min(finals)),
             "average_final_score_max": float(np.max(finals)),
             "sps": float(np.mean([m["sps"] for m in runs])),
             "seconds": float(np.mean([m["seconds"] for m in runs])),
             "device": runs[0]["device"], "date": runs[0]["date"],
             "eval": runs[0]["args"]["eval"],
             "eval_finished_share": float(np.mean([m["eval_finished"] for m in runs])
                                          / runs[0]["args"]["eval"]["episodes"])}
        rises = np.array([np.diag(m["retention"]) - np.array(m["initial"]) for m in runs])
        s["rise"] = rises.mean(0).tolist()
        if len(runs) > 1:            # over seeds: training and evaluation noise together
            s["rise_noise"] = half_width_95(rises.T).tolist()
            s["forgetting_noise"] = half_width_95(forgetting.T).tolist()
        elif "eval_returns" in runs[0]:                # one seed: the evaluation's noise
            rise, forgot = paired_changes(runs[0])
            s["rise_noise"] = half_width_95(rise).tolist()
            s["forgetting_noise"] = half_width_95(forgot).tolist()
        final_rows = np.array([m["human_normalized"][-1] for m in runs])  # [runs, games]
        known = final_rows[:, ~np.isnan(final_rows).any(0)]        # games in the table
        if known.size and len(runs) > 1:
            s["aggregate"] = aggregate_scores(known)
        if "hit_rate" in runs[0]:
            s["hit_rate"] = float(np.mean([np.mean(m["hit_rate"]) for m in runs]))
            s["mutual_information"] = float(np.mean([np.mean(m["mutual_information"])
                                                     for m in runs]))
            for key in ("dram_hit_rate", "router_entropy"):
                s[key] = float(np.mean([np.mean(m[key]) for m in runs]))
            if all("experts_per_game" in m for m in runs):   # older runs lack it
                s["experts_per_game"] = np.mean([m["experts_per_game"] for m in runs],
                                                0).tolist()
            if all("planner" in m for m in runs):      # the detector's plans, whole run
                for key in ("precision", "coverage"):
                    s[f"prefetch_{key}"] = float(np.mean([m["planner"][key] for m in runs]))
            s["bytes_moved"] = {link: float(np.mean([m["bytes_moved"][link] for m in runs]))
                                for link in runs[0]["bytes_moved"]}
        summary[kind] = s
    if "dense" in by_kind:
        for kind, runs in by_kind.items():
            if kind != "dense" and (paired := _paired_with_dense(runs, by_kind["dense"])):
                summary[kind]["vs_dense"] = paired
    return summary


def _pairs_by_seed(runs: Sequence[dict], baseline: Sequence[dict]) -> list[tuple[dict, dict]]:
    """``(run, baseline run)`` for each run whose seed the baseline also ran."""
    by_seed = {m["args"]["seed"]: m for m in baseline}
    return [(m, by_seed[m["args"]["seed"]]) for m in runs if m["args"]["seed"] in by_seed]


def _paired_with_dense(runs: Sequence[dict], dense: Sequence[dict]) -> dict | None:
    """Forgetting minus the dense baseline's, per game, paired by seed (same seed, same
    environments and evaluation): the mean difference over the seeds both kinds have and its
    95% t half-width (NaN with fewer than two such seeds); None without a common seed."""
    pairs = _pairs_by_seed(runs, dense)
    if not pairs:
        return None
    diff = np.array([np.subtract(m["forgetting"], d["forgetting"]) for m, d in pairs])
    return {"seeds": [m["args"]["seed"] for m, _ in pairs],
            "forgetting_difference": diff.mean(0).tolist(),
            "forgetting_difference_noise": half_width_95(diff.T).tolist()}


def format_summary(summary: Mapping[str, dict]) -> str:
    """Retention tables side by side (rows: after which stage; columns: games), each game's
    own-stage rise and forgetting with their noise, then the scores, speed and store figures
    of each kind of run."""
    kinds = list(summary)
    games = summary[kinds[0]]["games"]
    width = max(8, *(len(g) + 1 for g in games))
    label = max(18, *(len(g) + 7 for g in games))

    def row(name: str, values_per_kind: list[list[float]]) -> str:
        cells = [" ".join(f"{v:>{width}.1f}" for v in values) for values in values_per_kind]
        return f"{name:<{label}}" + "  |  ".join(cells)
    block = len(games) * (width + 1) - 1
    lines = ["retention: score on each game (columns) after training each stage (rows)",
             " " * label + "  |  ".join(f"{k} (seeds {','.join(map(str, summary[k]['seeds']))})"
                                        .center(block) for k in kinds),
             " " * label + "  |  ".join(" ".join(f"{g:>{width}}" for g in games)
                                        for _ in kinds),
             row("untrained", [summary[k]["initial"] for k in kinds])]
    for stage, game in enumerate(games):
        lines.append(row(f"after {game}", [summary[k]["retention"][stage] for k in kinds]))
    noise = all("rise_noise" in summary[k] for k in kinds)
    for name, key in (("rise in own stage", "rise"), ("forgetting", "forgetting")):
        lines.append(row(name, [summary[k][key] for k in kinds]))
        if noise:
            lines.append(row("  noise (95%)", [summary[k][f"{key}_noise"] for k in kinds]))
    first = summary[kinds[0]]
    lines.append(f"(evaluation: {first['eval']['episodes']} episodes per game from fixed seeds, "
                 f"capped at {first['eval']['max_steps']} steps; "
                 f"{first['eval_finished_share']:.0%} of them finished, the others score "
                 "what they had at the cap)")
    lines.append("")
    for k in kinds:
        s = summary[k]
        text = f"{k:<6} average final human-normalised score {s['average_final_score']:6.1f}"
        if len(s["seeds"]) > 1:
            text += (f" (seeds: {s['average_final_score_min']:.1f} to "
                     f"{s['average_final_score_max']:.1f})")
        if "aggregate" in s:
            a = s["aggregate"]
            text += (f"  IQM {a['iqm']:.1f} [{a['iqm_interval'][0]:.1f}, "
                     f"{a['iqm_interval'][1]:.1f}] (runs x games, 95% stratified bootstrap)")
        text += f"  SPS {s['sps']:5.0f}  {s['seconds'] / 60:5.1f} min/run"
        lines.append(text)
        if "hit_rate" in s:
            text = (f"{'':<6} HBM hit rate {s['hit_rate']:.1%}, DRAM {s['dram_hit_rate']:.1%}"
                    f"  game-expert NMI {s['mutual_information']:.3f}  router entropy "
                    f"{s['router_entropy']:.2f} (1: uniform)")
            if "experts_per_game" in s:
                text += "  experts per game " + "/".join(f"{v:.1f}"
                                                         for v in s["experts_per_game"])
            if "prefetch_precision" in s:
                text += (f"  prefetch precision {s['prefetch_precision']:.0%} coverage "
                         f"{s['prefetch_coverage']:.0%}")
            moved = sum(s["bytes_moved"].values()) / 1e9
            lines.append(text + f"  {moved:.1f} GB moved/run")
    return "\n".join(lines)


def format_verdict(summary: Mapping[str, dict]) -> str:
    """What the figures support, per kind of run: which games rose during their own stage
    beyond the noise (the 95% half-width: over seeds, or with one seed over the evaluation's
    paired episodes), which were then forgotten beyond it, how much the experts depend on the
    game, and, paired by seed with the dense baseline, on which games both learned the kind
    forgot more or less than dense beyond the noise of the paired differences. A difference
    inside the noise counts as none."""
    learned = {kind: _learned(s) for kind, s in summary.items()}
    lines = []
    for kind, s in summary.items():
        if learned[kind] is None:
            lines.append(f"{kind}: no noise estimate (one seed and one episode, or no "
                         "per-episode returns); no verdict")
            continue
        forgot = [g for g, f, e in zip(s["games"][:-1], s["forgetting"], s["forgetting_noise"])
                  if g in learned[kind] and f > e]
        text = (f"{kind}: learned beyond noise during its own stage: "
                f"{', '.join(learned[kind]) or 'no game'}; of those, forgotten beyond noise by "
                f"the end: {', '.join(forgot) or 'none'}")
        if "mutual_information" in s:
            text += f"; game-expert NMI {s['mutual_information']:.2f}"
        if "vs_dense" in s:
            both = set(learned[kind]) & set(learned.get("dense") or [])
            text += "; " + _versus_dense(s["games"][:-1], s["vs_dense"], both)
        lines.append(text)
    return "\n".join(lines)


def _learned(s: dict) -> list[str] | None:
    """The games that rose beyond the noise during their own stage; None without noise."""
    if np.isnan(s.get("rise_noise", [np.nan])).any():
        return None
    return [g for g, r, e in zip(s["games"], s["rise"], s["rise_noise"]) if r > e]


def _versus_dense(games: Sequence[str], paired: dict, learned: set[str]) -> str:
    """The verdict's comparison with dense on the ``learned`` games (forgetting a game that
    was never learned is noise): per game, less / more / no different."""
    seeds = ",".join(map(str, paired["seeds"]))
    if len(paired["seeds"]) < 2:
        return f"against dense (seed {seeds}): no noise estimate, no comparison"
    verdicts = [f"{game} {word} ({d:+.1f} +- {e:.1f})"
                for game, (word, d, e) in _compared_with_dense(games, paired, learned).items()]
    return (f"forgetting against dense, paired over seeds {seeds}, on the games both "
            f"learned: {', '.join(verdicts) or 'none'}")


def _compared_with_dense(games: Sequence[str], paired: dict,
                         learned: set[str]) -> dict[str, tuple[str, float, float]]:
    """Per ``learned`` game: ``("less" | "more" | "no different", difference, noise)``, the
    kind's forgetting minus dense's paired by seed against its 95% half-width."""
    compared = {}
    for game, d, e in zip(games, paired["forgetting_difference"],
                          paired["forgetting_difference_noise"]):
        if game in learned:
            compared[game] = ("less" if d < -e else "more" if d > e else "no different", d, e)
    return compared


def format_forgetting_table(summary: Mapping[str, dict]) -> str:
    """What the verdict rests on, as a Markdown table with one row per kind: its seeds, the
    forgetting of each game but the last (none plays after it) with its noise and, in
    brackets, minus dense's paired by seed; the last game's rise (what the kind could still
    learn); the game-expert NMI and HBM hit rate of MoE kinds. A dagger marks a game not
    learned beyond the noise in its own stage (its forgetting is noise). Under the table,
    the kinds that forgot a game both they and dense learned less or more than dense beyond
    the noise of the paired differences."""
    learned = {kind: set(_learned(s) or []) for kind, s in summary.items()}
    games = next(iter(summary.values()))["games"]
    rows = ["| kind | seeds | "
            + " | ".join(f"forgetting of {g} (minus dense's)" for g in games[:-1])
            + f" | rise on {games[-1]} | NMI | HBM hit rate |",
            "|---" * (len(games) + 4) + "|"]
    findings: dict[str, list[str]] = {"less": [], "more": []}
    for kind, s in summary.items():
        paired = s.get("vs_dense")
        both = learned[kind] & learned.get("dense", set())
        compared = (_compared_with_dense(games[:-1], paired, both)
                    if paired and len(paired["seeds"]) > 1 else {})
        cells = []
        for i, game in enumerate(games[:-1]):
            cell = f"{s['forgetting'][i]:.1f} ± {_noise(s, 'forgetting_noise', i)}"
            if game not in learned[kind]:
                cell += " †"
            if paired:
                d = paired["forgetting_difference"][i]
                cell += (f" ({d:+.1f} ± {paired['forgetting_difference_noise'][i]:.1f})"
                         if len(paired["seeds"]) > 1 else f" ({d:+.1f}, one seed)")
            cells.append(cell)
            if game in compared and compared[game][0] in findings:
                findings[compared[game][0]].append(f"`{kind}` on {game}")
        store = (f"{s['mutual_information']:.2f} | {s['hit_rate']:.1%}"
                 if "hit_rate" in s else " | ")
        rows.append(f"| `{kind}` | {','.join(map(str, s['seeds']))} | " + " | ".join(cells)
                    + f" | {s['rise'][-1]:.1f} ± {_noise(s, 'rise_noise', -1)} | {store} |")
    dagger = ["", "† not learned beyond the noise in its own stage."] if any(
        "†" in row for row in rows) else []
    less, more = (", ".join(findings[word]) or "no kind" for word in ("less", "more"))
    return "\n".join(rows + dagger + [
        "", f"Forgot less than `dense` beyond the noise: {less}. More: {more}."])


def _noise(s: dict, key: str, index: int) -> str:
    """A summary's 95% half-width at ``index`` of ``key``, or "?" where it has none."""
    value = s.get(key, [math.nan] * len(s["games"]))[index]
    return "?" if math.isnan(value) else f"{value:.1f}"


def early_learning(history: Sequence[dict], at: int, last: int = 5,
                   last_episodes: int = 100) -> dict:
    """How far a run had got by ``global_step`` ``at`` (its updates up to there): the
    critic's ``explained_variance`` and the policy ``entropy``, each the mean over the
    ``last`` updates (CleanRL's ``losses/*``), the mean training return of the episodes
    finished by then (``episodes`` of them) and of the ``last_episodes`` of them
    (``return_last``: where the agent had got to). A critic that explains none of the
    returns' variance is the earliest sign that an agent will not learn."""
    upto = [h for h in history if h["global_step"] <= at]
    if not upto or upto[-1]["global_step"] < at:
        reached = history[-1]["global_step"] if history else 0
        raise ValueError(f"the run reached step {reached}, not {at}")
    tail = upto[-last:]
    returns = [r for h in upto for r in h.get("charts/episodic_returns", [])]
    return {"explained_variance": float(np.mean([h["losses/explained_variance"]
                                                  for h in tail])),
            "entropy": float(np.mean([h["losses/entropy"] for h in tail])),
            "return": float(np.mean(returns)) if returns else math.nan,
            "return_last": float(np.mean(returns[-last_episodes:])) if returns else math.nan,
            "episodes": len(returns)}


def uniform_entropy(args: Mapping, game: str) -> float:
    """The entropy of a uniform policy over the actions a run's agent may take in ``game``:
    log 18, or log of the game's own actions with ``action_mask="legal"`` (``action_masks``)."""
    if args.get("action_mask", "none") == "legal":
        return math.log(int(action_masks([game], NUM_ACTIONS).sum()))
    return math.log(NUM_ACTIONS)


def learning_table(runs: Mapping[str, dict], at: int) -> dict[str, dict]:
    """Per kind of run (the name before ``-seed``), over its seeds: ``early_learning`` at
    ``at`` (mean, min and max of each figure), the seeds, one run's command and the entropy
    of a uniform policy over its actions at ``at`` (``uniform_entropy``). Runs that stopped
    before ``at`` are left out; unfinished ones count up to ``at``."""
    by_kind: dict[str, list] = {}
    for name, metrics in sorted(runs.items()):
        try:
            figures = early_learning(metrics["history"], at)
        except ValueError:
            continue
        by_kind.setdefault(run_kind(name), []).append((metrics, figures))
    table = {}
    for kind, rows in by_kind.items():
        first = rows[0][0]
        game = next(h.get("game", "") for h in reversed(first["history"])
                    if h["global_step"] <= at)
        entry = {"seeds": [m["args"]["seed"] for m, _ in rows], "command": first["command"],
                 "uniform_entropy": uniform_entropy(first["args"], game)}
        for key in ("explained_variance", "entropy", "return", "return_last"):
            values = [f[key] for _, f in rows]
            entry[key] = float(np.mean(values))
            entry[f"{key}_min"], entry[f"{key}_max"] = float(np.min(values)), float(np.max(values))
        table[kind] = entry
    return table


def format_learning_table(table: Mapping[str, dict], at: int) -> str:
    """``learning_table`` as a markdown table (means over seeds, their range in brackets)."""
    other = ", ".join(f"{kind} {e['uniform_entropy']:.2f}" for kind, e in table.items()
                      if not math.isclose(e["uniform_entropy"], math.log(NUM_ACTIONS)))
    lines = [f"| run | seeds | explained variance at {at:,} steps | policy entropy "
             f"(uniform: {math.log(NUM_ACTIONS):.2f}{'; ' + other if other else ''}) | "
             "training return | the last 100 episodes' |",
             "|---|---|---|---|---|---|"]
    for kind, e in table.items():
        cells = [f"{e[k]:.2f} [{e[k + '_min']:.2f}, {e[k + '_max']:.2f}]"
                 for k in ("explained_variance", "entropy", "return", "return_last")]
        lines.append(f"| {kind} | {','.join(map(str, e['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


CACHE_PHASES = ("rollout", "update", "optimizer")
SWITCH_PHASES = ("rollout", "eval")        # training switches; the evaluation's, game by game


def cache_table(runs: Mapping[str, dict]) -> dict[str, dict]:
    """Per kind of traced MoE run (the name before ``-seed``), means over its seeds of what
    routing buys the cache and what it costs: experts per game per layer and the game-expert
    NMI (the evaluation's routing), the HBM hit rate per phase of the store and of Belady's
    policy on the same trace, prefetch precision and coverage (store, rollout), bytes moved
    per update by the store, plain LRU and Belady, the planner's precision and coverage at
    game switches in training and in evaluation (``PrefetchPlanner.summary``), stall
    seconds, SPS and the final score, with its difference from ``token``'s (plain routing,
    batch balance) paired by seed and the 95% half-width of that difference
    (``score_vs_token``, ``score_vs_token_noise``: nan without two shared seeds). Runs
    without a trace (no ``belady``) are left out."""
    by_kind: dict[str, list] = {}
    for name, m in sorted(runs.items()):
        if "belady" in m:
            by_kind.setdefault(run_kind(name), []).append(m)
    table = {}
    for kind, rows in by_kind.items():
        def mean(get) -> float:
            return float(np.mean([get(m) for m in rows]))
        entry = {"seeds": [m["args"]["seed"] for m in rows], "command": rows[0]["command"],
                 "experts_per_game": np.mean([m["experts_per_game"] for m in rows], 0).tolist(),
                 "nmi": mean(lambda m: np.mean(m["mutual_information"])),
                 "sps": mean(lambda m: m["sps"]),
                 "score": mean(lambda m: m["average_final_score"]),
                 "stall_seconds": mean(lambda m: sum(
                     p["stall_seconds"] for p in m["cache"]["phases"].values()))}
        for source in ("cache", "belady"):
            for phase in CACHE_PHASES:
                entry[f"{source}_{phase}_hit_rate"] = mean(
                    lambda m: m[source]["phases"][phase]["hbm_hit_rate"])
        for key in ("prefetch_precision", "prefetch_coverage"):
            entry[key] = mean(lambda m: m["cache"]["phases"]["rollout"][key])
        for phase in SWITCH_PHASES:          # nan: a run older than the planner's phases
            for key in ("switches", "switch_precision", "switch_coverage"):
                entry[f"{phase}_{key}"] = mean(lambda m: m.get("planner", {}).get(
                    "switch_phases", {}).get(phase, {}).get(key, math.nan))
        for source in ("cache", "lru", "belady"):
            entry[f"{source}_bytes_per_update"] = mean(lambda m: m[source]["bytes_per_update"])
        pairs = _pairs_by_seed(rows, by_kind.get("token", [])) if kind != "token" else []
        diff = np.array([m["average_final_score"] - t["average_final_score"] for m, t in pairs])
        entry["score_vs_token"] = float(diff.mean()) if len(diff) > 1 else math.nan
        entry["score_vs_token_noise"] = float(half_width_95(diff))     # nan below two seeds
        table[kind] = entry
    return table


def _percent(x: float) -> str:
    """``x`` as a percentage; "-" where it was not measured (a run older than the figure)."""
    return "-" if math.isnan(x) else f"{x:.1%}"


def format_cache_table(table: Mapping[str, dict]) -> str:
    """``cache_table`` as a markdown table; hit rates as store / Belady per phase, bytes per
    update in MiB as store / plain LRU / Belady."""
    lines = ["| run | seeds | experts per game (per layer) | NMI | HBM hit rate, store / "
             "Belady: rollout; update; optimizer | prefetch precision / coverage (rollout) "
             "| planner at game switches, precision / coverage: training; evaluation "
             "| MiB per update: store / LRU / "
             "Belady | stall s | SPS | final score (minus token's, paired) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, e in table.items():
        hits = "; ".join(f"{e[f'cache_{p}_hit_rate']:.1%} / {e[f'belady_{p}_hit_rate']:.1%}"
                         for p in CACHE_PHASES)
        switches = "; ".join(f"{_percent(e[f'{p}_switch_precision'])} / "
                             f"{_percent(e[f'{p}_switch_coverage'])}" for p in SWITCH_PHASES)
        moved = " / ".join(f"{e[f'{s}_bytes_per_update'] / 2**20:,.1f}"
                           for s in ("cache", "lru", "belady"))
        versus = ("" if math.isnan(e["score_vs_token_noise"]) else
                  f" ({e['score_vs_token']:+.1f} ± {e['score_vs_token_noise']:.1f})")
        lines.append(
            f"| {kind} | {','.join(map(str, e['seeds']))} | "
            f"{', '.join(f'{x:.1f}' for x in e['experts_per_game'])} | {e['nmi']:.2f} | {hits} | "
            f"{e['prefetch_precision']:.1%} / {e['prefetch_coverage']:.1%} | "
            f"{switches} | {moved} | "
            f"{e['stall_seconds']:.1f} | {e['sps']:.0f} | {e['score']:.1f}{versus} |")
    return "\n".join(lines)
