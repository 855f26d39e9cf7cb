"""ScienceWorld step speed: sage_gym's step against the raw simulator calls of a stock JVM, and the stock env.step.

All run side by side in one process on the same action sequences (gold paths of a few tasks of the
scienceworld-unseen panel), every JVM warmed up by one replay of every path first, then interleaved
per repeat so machine load hits them alike:

- gym: ``env.step(response)`` of sage_gym (a whole ReAct response: parsing, schema check, messages),
  on its deterministic JVM (EnvObject hashed by uuid, ``-XX:hashCode=2`` for the rest);
- raw: the simulator's ``step`` + ``getScore`` + ``getCompleted`` over py4j, on the gym's JVM, on a
  separate stock ``scienceworld.ScienceWorldEnv``'s JVM (default flags: the target's reference) and on
  a JVM with ``-XX:hashCode=2`` alone (the previous deterministic setting, whose hash sets collapse);
- stock: ``scienceworld.ScienceWorldEnv.step`` (lists every valid action each step).

Wall times on a shared machine are noisy, so the raw calls' JVM thread CPU time is measured too (the
py4j connection thread's ``getCurrentThreadCpuTime``): it does not count time spent waiting for a core;
and the gym's own cost is measured directly, its step time minus the time inside its simulator calls.

    .venv/bin/python bench/bench_scienceworld.py [--tasks find-animal boil ...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

import sage_gym
from sage_gym.envs.scienceworld import episode_ids

TASKS = ["find-animal", "lifespan-longest-lived", "chemistry-mix", "power-component", "boil", "use-thermometer"]
RAW = ("raw_gym", "raw_stock", "raw_hc2")


def timed_steps(step, actions: list[str]) -> list[float]:
    times = []
    for action in actions:
        start = time.perf_counter()
        step(action)
        times.append(time.perf_counter() - start)
    return times


class Raw:
    """The raw step + score + completion calls on one JVM's simulator, with the JVM thread's CPU seconds."""

    def __init__(self, gateway, server):
        self.server = server
        self.bean = gateway.jvm.java.lang.management.ManagementFactory.getThreadMXBean()
        self.cpu: list[float] = []

    def run(self, task: str, variation: int, actions: list[str]) -> list[float]:
        self.server.load(task, variation, "", False)
        self.server.step("look around")

        def step(action: str):
            start = self.bean.getCurrentThreadCpuTime()
            self.server.step(action)
            self.server.getScore()
            self.server.getCompleted()
            self.cpu.append((self.bean.getCurrentThreadCpuTime() - start) / 1e9)

        return timed_steps(step, actions)


def hash_code_2_jvm():
    """A simulator JVM with the previous deterministic setting: every identity hash 1, EnvObject unpatched."""
    from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
    from scienceworld.constants import BASEPATH, JAR_PATH

    port, proc = launch_gateway(classpath=JAR_PATH, die_on_exit=True, cwd=BASEPATH, return_proc=True,
                                javaopts=["-Xmx512m", "-XX:+UseSerialGC", "-XX:+UnlockExperimentalVMOptions",
                                          "-XX:hashCode=2"])
    gateway = JavaGateway(gateway_parameters=GatewayParameters(port=port), java_process=proc)
    return gateway, gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, help="tasks (first variation in scienceworld-unseen)")
    parser.add_argument("--repeats", type=int, default=3, help="timed replays of each gold path per method")
    args = parser.parse_args()

    from scienceworld import ScienceWorldEnv as StockEnv

    console = Console(width=170)
    env = sage_gym.make("scienceworld-unseen", max_turns=10_000)
    gym = env.unwrapped
    stock = StockEnv("", envStepLimit=10_000)
    hc2_gateway, hc2_server = hash_code_2_jvm()
    paths = []
    for task in args.tasks:
        episode_id = next(e for e in episode_ids("unseen") if e.startswith(task + "/"))
        env.reset(options={"episode_id": episode_id})
        actions = gym.expert_actions()
        for n, action in enumerate(actions, 1):  # some gold paths go on after the task is complete
            if env.step(gym.formatter.format_action(action))[2]:
                actions = actions[:n]
                break
        paths.append((episode_id, task, int(episode_id.split("/")[1]), actions))
    raw = {"raw_gym": Raw(gym._jvm.gateway, gym._jvm.server), "raw_stock": Raw(stock._gateway, stock.server),
           "raw_hc2": Raw(hc2_gateway, hc2_server)}

    in_jvm, overhead = [0.0], []  # the gym's own cost: its step minus the time inside its simulator calls
    jvm_call = gym._call

    def counted_call(*call_args):
        start = time.perf_counter()
        try:
            return jvm_call(*call_args)
        finally:
            in_jvm[0] += time.perf_counter() - start

    def gym_step(action: str):
        in_jvm[0], start = 0.0, time.perf_counter()
        env.step(gym.formatter.format_action(action))
        overhead.append(time.perf_counter() - start - in_jvm[0])

    gym._call = counted_call

    def replay(episode_id: str, task: str, variation: int, actions: list[str]) -> dict[str, list[float]]:
        env.reset(options={"episode_id": episode_id})
        times = {"gym": timed_steps(gym_step, actions)}
        won = gym._won
        for key, calls in raw.items():
            times[key] = calls.run(task, variation, actions)
        stock.load(task, variation, "")
        stock.reset()
        times["stock"] = timed_steps(stock.step, actions)
        times["won"] = won
        return times

    for path in paths:  # warm-up: every JVM plays every path once, untimed
        replay(*path)
    for calls in raw.values():
        calls.cpu.clear()
    overhead.clear()

    columns = ("gym", *RAW, "stock")
    table = Table(title=f"ScienceWorld ms per step (mean over {args.repeats} warm replays of each gold path)")
    for col in ("episode", "steps", "gym won", "gym", "raw (gym JVM)", "raw (stock JVM)", "raw (hashCode=2 JVM)",
                "stock step", "gym / raw stock JVM", "hashCode=2 / stock JVM"):
        table.add_column(col, justify="left" if col == "episode" else "right")
    totals: dict[str, list[float]] = {k: [] for k in columns}
    for episode_id, task, variation, actions in paths:
        times: dict[str, list[float]] = {k: [] for k in columns}
        won = True
        for _ in range(args.repeats):
            got = replay(episode_id, task, variation, actions)
            won &= got.pop("won")
            for k, v in got.items():
                times[k] += v
        mean = {k: 1000 * statistics.mean(v) for k, v in times.items()}
        for k, v in times.items():
            totals[k] += v
        table.add_row(episode_id, str(len(actions)), "yes" if won else "NO", *(f"{mean[k]:.1f}" for k in columns),
                      f"{mean['gym'] / mean['raw_stock']:.2f}x", f"{mean['raw_hc2'] / mean['raw_stock']:.2f}x")
    mean = {k: 1000 * statistics.mean(v) for k, v in totals.items()}
    median = {k: 1000 * statistics.median(v) for k, v in totals.items()}
    for label, stat in (("all steps (mean)", mean), ("all steps (median)", median)):
        table.add_row(label, str(len(totals["gym"])) if stat is mean else "", "", *(f"{stat[k]:.1f}" for k in columns),
                      f"{stat['gym'] / stat['raw_stock']:.2f}x", f"{stat['raw_hc2'] / stat['raw_stock']:.2f}x")
    console.print(table)
    cpu = {k: 1000 * statistics.mean(calls.cpu) for k, calls in raw.items()}
    console.print(f"gym step / raw calls on a stock JVM: {mean['gym'] / mean['raw_stock']:.2f}x mean, "
                  f"{median['gym'] / median['raw_stock']:.2f}x median (target <= 1.3x); "
                  f"gym step / raw calls on its own JVM: {mean['gym'] / mean['raw_gym']:.2f}x mean")
    console.print(f"JVM thread CPU of the raw calls, ms per step: gym JVM {cpu['raw_gym']:.2f}, stock JVM "
                  f"{cpu['raw_stock']:.2f}, hashCode=2 JVM {cpu['raw_hc2']:.2f}; gym JVM / stock JVM "
                  f"{cpu['raw_gym'] / cpu['raw_stock']:.2f}x, hashCode=2 / stock {cpu['raw_hc2'] / cpu['raw_stock']:.2f}x")
    console.print(f"gym cost outside the simulator calls: {1000 * statistics.median(overhead):.3f} ms per step "
                  f"(median); stock env.step / gym step: {mean['stock'] / mean['gym']:.1f}x mean")
    env.close()
    stock.close()
    hc2_gateway.shutdown()


if __name__ == "__main__":
    main()
