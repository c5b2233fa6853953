"""Test helpers for the Flower app: an in-process Grid, a tiny task, and real Flower processes.

``InProcessGrid`` hands each message straight to the ClientApp with one ``Context`` per node,
so the ServerApp/ClientApp logic can be checked in seconds (``run_in_process``; ``crash_server_after``
makes the ServerApp die mid-run). ``configured_server_app`` and ``StateDirClientApp`` adapt the apps
to Flower's simulation engine, which passes no run config and only ``partition-id`` /
``num-partitions`` as node config. ``FlowerDeployment`` starts a real SuperLink and SuperNodes as
separate processes (TLS, SuperNode authentication) and always stops every process it started, with
their children, even when a test fails.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedpeptao.flower.client_app import app as client_app
from fedpeptao.flower.server_app import app as server_app
from fedpeptao.flower.settings import RUN_CONFIG_DEFAULTS
from fedpeptao.utils.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POSITIVE = ["a great and moving film", "wonderful acting and a clever story", "i loved every minute of it",
            "a joyful delight", "brilliant , warm and funny", "beautifully shot and sharply written"]
NEGATIVE = ["a dull and tedious mess", "boring from start to end", "i hated the plot",
            "a clumsy waste of time", "flat , lifeless and silly", "badly written and painfully slow"]
ENDINGS = ["", " indeed", " overall", " truly", " for sure"]


@pytest.fixture
def keep_process_settings():
    """The in-process apps set torch's thread count, Flower's task identity and log handlers, as they
    would in their own process; give the rest of the test session its settings back. One thread, as
    each client uses: tiny models run much faster so, most of all on a busy machine.

    Import it into a test module and name it in ``pytestmark``'s ``usefixtures`` (or autouse there).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    logger = logging.getLogger("fedpeptao")
    handlers, level = list(logger.handlers), logger.level
    yield
    torch.set_num_threads(threads)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
    logger.handlers[:] = handlers
    logger.setLevel(level)


def write_task(folder: Path, train: int = 40, test: int = 16) -> Path:
    """A small labelled sentiment task (train.tsv, test.tsv), the same every time."""
    folder.mkdir(parents=True, exist_ok=True)

    def rows(count: int, offset: int) -> str:
        lines = ["sentence\tlabel"]
        for i in range(count):
            label = (i + offset) % 2
            words = POSITIVE if label else NEGATIVE
            lines.append(f"{words[(i * 7 + offset) % len(words)]}{ENDINGS[(i * 3 + offset) % len(ENDINGS)]}\t{label}")
        return "\n".join(lines) + "\n"

    (folder / "train.tsv").write_text(rows(train, 0))
    (folder / "test.tsv").write_text(rows(test, 1))
    return folder


def tiny_experiment(task: Path, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A 2-client FedPepTAO experiment (deep prompts, half the layers shared) on a tiny random BERT:
    seconds per round on a CPU.

    A ``method`` or ``tuning`` section naming another algorithm or tuning replaces that table (the
    default's settings are not the other one's); any other section updates the default's.
    """
    cfg: dict[str, Any] = {
        "seed": 7, "progress": False,
        # A Flower node trains its one client per message; the simulator is compared in the same order
        # (batched passes draw dropout for the pass, so they match sequential runs only with it off).
        "execution": "sequential",
        "model": {"name": "tiny-bert", "max_length": 32},
        "data": {"task": str(task), "partition": "iid"},
        "federated": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
        "client": {"epochs": 1, "batch_size": 8},
        "method": {"name": "fedpeptao", "ratio": 0.5},
        "tuning": {"name": "deep_prompt", "num_prompt_tokens": 4},
    }
    for name, values in sections.items():
        if not isinstance(values, Mapping):
            cfg[name] = values
        elif name in ("method", "tuning") and values.get("name", cfg[name]["name"]) != cfg[name]["name"]:
            cfg[name] = dict(values)
        else:
            cfg.setdefault(name, {}).update(values)
    return cfg


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Minimal TOML writer for flat tables of scalars (all an experiment file needs)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in data.items() if isinstance(v, Mapping)]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")
    return path


# -- in-process Flower ----------------------------------------------------------------------------

class InProcessGrid(Grid):
    """Delivers messages synchronously to ``client_app``, one ``Context`` per node: nodes in ``silent``
    never answer (a timeout), nodes in ``raising`` answer with an error, as a crashed ClientApp does,
    nodes in ``offline`` are not listed and never answer. With ``wire``, each message and reply goes
    through Flower's protobuf serde, as over a connection (SecAgg+'s mod edits what it gets). Every
    message is kept in ``sent``, every reply the server code receives in ``received``; a subclass
    decides a node's reply in ``answer`` (e.g. silence or an error at one SecAgg+ stage)."""

    def __init__(self, client_app: ClientApp, node_configs: Mapping[int, Mapping[str, Any]], run_id: int = 1,
                 *, wire: bool = False) -> None:
        self.client_app = client_app
        self.wire = wire
        # Flower stamps new messages with the running task's identity; in-process we are that task.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self.contexts = {node: Context(run_id, node, dict(conf), RecordDict(), {})
                         for node, conf in node_configs.items()}
        self.silent: set[int] = set()
        self.raising: set[int] = set()
        self.offline: set[int] = set()
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.contexts if node not in self.offline]

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def carry(self, message: Message) -> Message:
        """``message`` as it arrives at the other side of a connection (itself unless ``wire``)."""
        return message_from_proto(message_to_proto(message)) if self.wire else message

    def answer(self, node: int, message: Message) -> Message | None:
        """Node ``node``'s reply to ``message``, None for none (a timeout). Not asked for a node in
        ``silent`` or ``offline``."""
        if node in self.raising:
            return Message(Error(code=0, reason="ClientApp raised"), reply_to=message)
        try:
            return self.client_app(message=self.carry(message), context=self.contexts[node])
        except Exception as exc:  # as Flower's ClientApp runner does: the error travels as the reply
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.sent.append(message)
            node = message.metadata.dst_node_id
            reply = None if node in self.silent or node in self.offline else self.answer(node, message)
            if reply is not None:
                replies.append(self.carry(reply))
        self.received.extend(replies)
        return replies


def secagg_stage(message: Message) -> str | None:
    """The SecAgg+ stage ``message`` asks for (None: not a SecAgg+ message)."""
    return message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)


def node_configs(root: Path, num_clients: int, **extra: Any) -> dict[int, dict[str, Any]]:
    """Node id ``1000 + k`` is client ``k``, its state in ``root/state-k``."""
    return {1000 + k: {"partition-id": k, "num-partitions": num_clients, "state-dir": str(root / f"state-{k}"),
                       **extra} for k in range(num_clients)}


def run_server_app(grid: Grid, config: Path, out: Path, **run_config: Any) -> Path:
    """Call the ServerApp once (as one ``flwr run``) on ``grid``; returns the output dir."""
    settings = {**RUN_CONFIG_DEFAULTS, "config": str(config), "output-dir": str(out), "node-wait-timeout": 0.0,
                **run_config}
    server_app(grid, Context(1, 0, {}, RecordDict(), settings))
    return out


def run_in_process(root: Path, experiment: Mapping[str, Any], grid_setup=None, node_extra: dict | None = None,
                   **run_config: Any) -> tuple[Path, InProcessGrid]:
    """Run the ServerApp against in-process ClientApps, one node per partition: (output dir, grid)."""
    root.mkdir(parents=True, exist_ok=True)
    config = write_toml(root / "experiment.toml", experiment)
    grid = InProcessGrid(client_app, node_configs(root, experiment["federated"]["num_clients"], **(node_extra or {})))
    if grid_setup is not None:
        grid_setup(grid)
    return run_server_app(grid, config, root / "out", **run_config), grid


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


from fedpeptao.utils.round_log import TIMING  # noqa: E402


def rows_without_timing(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns (they differ between any two runs)."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics(out)]


def max_abs_diff(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]) -> float:
    assert expected.keys() == actual.keys(), sorted(set(expected) ^ set(actual))
    return max(((e.double() - actual[k].double()).abs().max().item() if e.numel() else 0.0)
               for k, e in expected.items())


class ServerCrash(RuntimeError):
    """The ServerApp process died (raised by ``crash_server_after``)."""


def crash_server_after(grid: Grid, checkpoint_dir: Path, round_number: int) -> None:
    """Make the ServerApp die at its first train exchange after round ``round_number``'s checkpoint
    (rounds numbered from 1, as the checkpoints are).

    The train messages reach the nodes first (they train, and keep that round's state), then the
    server dies before it sees a reply: the hardest point to continue from, as the restarted
    ServerApp replays a round the nodes have already trained. Any exchange before it (an
    algorithm's client tasks, e.g. FedPepTAO's Hessian ratio) goes through normally.
    """
    original = grid.send_and_receive
    checkpoints = Path(checkpoint_dir)

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        saved = any(r >= round_number for r, _ in list_checkpoints(checkpoints))
        if saved and any(m.metadata.message_type == "train" for m in messages):
            grid.send_and_receive = original  # disarmed: a restart runs normally
            original(messages, timeout=timeout)
            raise ServerCrash(f"ServerApp killed after the checkpoint of round {round_number}")
        return original(messages, timeout=timeout)

    grid.send_and_receive = send_and_receive


# -- Flower's simulation engine ------------------------------------------------------------------

class _GridProxy:
    """A Grid seen through ``crash_server_after`` (the engine's grid is not ours to patch)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.send_and_receive = grid.send_and_receive

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def configured_server_app(run_config: Mapping[str, Any], crash_after: int | None = None) -> ServerApp:
    """The package's ServerApp with ``run_config`` (``flwr.simulation.run_simulation`` passes the
    ServerApp an empty run config); with ``crash_after``, it dies as in ``crash_server_after``.

    The engine starts the ServerApp before it registers its virtual nodes: set ``min-nodes`` and a
    ``node-wait-timeout`` so the ServerApp waits for them.
    """
    wrapper = ServerApp()
    settings = {**RUN_CONFIG_DEFAULTS, **run_config}

    @wrapper.main()
    def main(grid: Grid, context: Context) -> None:
        context.run_config = dict(settings)
        if crash_after is not None:
            grid = _GridProxy(grid)
            crash_server_after(grid, Path(settings["checkpoint-dir"] or settings["output-dir"]), crash_after)
        server_app(grid, context)

    return wrapper


class StateDirClientApp(ClientApp):
    """The package's ClientApp with ``state-dir`` added to each node's config: the simulation engine's
    node config holds only ``partition-id`` and ``num-partitions``."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__()
        self.state_dir = str(state_dir)

    def __call__(self, message: Message, context: Context) -> Message:
        partition = context.node_config["partition-id"]
        context.node_config = {**context.node_config, "state-dir": f"{self.state_dir}/node-{partition}"}
        return client_app(message=message, context=context)


def run_with_simulation_engine(root: Path, experiment: Mapping[str, Any], app: type[ClientApp] | None = None) -> Path:
    """``experiment`` on 2 virtual SuperNodes of Flower's simulation engine (Ray, one actor), each
    node's state under ``root/state``; returns the output dir. ``app``: a StateDirClientApp class."""
    from flwr.simulation import run_simulation  # noqa: PLC0415

    config = write_toml(root / "experiment.toml", experiment)
    run_config = {"config": str(config), "output-dir": str(root / "out"), "round-timeout": 120.0,
                  "min-nodes": 2, "node-wait-timeout": 60.0}
    backend = {"init_args": {"num_cpus": 1, "include_dashboard": False},
               "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(configured_server_app(run_config), (app or StateDirClientApp)(root / "state"), num_supernodes=2,
                   backend_name="ray", backend_config=backend)
    return root / "out"


# -- real processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Every descendant of ``pid`` as ``(pid, start time)``, so detached grandchildren are stopped too
    and a recycled pid is never mistaken for one of them."""
    parents: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _alive(process: tuple[int, str]) -> bool:
    fields = _stat(process[0])
    return fields is not None and fields[0] != "Z" and fields[19] == process[1]


def _signal(processes: list[tuple[int, str]], sig: int) -> None:
    for process in processes:
        if _alive(process):
            try:
                os.kill(process[0], sig)
            except ProcessLookupError:
                pass


def stop_process(proc: subprocess.Popen, hard: bool = False) -> None:
    """Stop a process we started, its process group and every descendant (they may detach)."""
    victims = _descendants(proc.pid)
    sig = signal.SIGKILL if hard else signal.SIGTERM
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    _signal(victims, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(v) for v in victims):
        time.sleep(0.1)
    _signal(victims, signal.SIGKILL)


class FlowerDeployment:
    """A SuperLink with TLS and SuperNode authentication, and SuperNodes, on 127.0.0.1.

    Use as a context manager: on exit every process started here is stopped, with its children.
    """

    def __init__(self, root: Path, certs: Path) -> None:
        self.root, self.certs = root, certs
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2", "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{certs / "ca.crt"}"\n')

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            stop_process(self.procs.pop(name))

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def start_superlink(self) -> None:
        c = self.certs
        self._start("superlink", [str(BIN / "flower-superlink"), "--port", str(self.port),
                                  "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
                                  "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
                                  "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError("SuperLink exited:\n" + self.log("superlink"))
            if "Uvicorn running" in self.log("superlink"):
                return
            time.sleep(0.2)
        raise RuntimeError("SuperLink did not start:\n" + self.log("superlink"))

    def register(self, *public_keys: Path) -> None:
        """``flwr supernode register KEY test`` for each key (in parallel: each call is a CLI start-up)."""
        calls = [subprocess.Popen([str(BIN / "flwr"), "supernode", "register", str(key), "test"], env=self.env,
                                  cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for key in public_keys]
        outputs = [call.communicate(timeout=60)[0] for call in calls]
        failed = [out for call, out in zip(calls, outputs) if call.returncode != 0]
        if failed:
            raise RuntimeError("flwr supernode register failed:\n" + "\n".join(failed))

    def start_supernode(self, name: str, private_key: Path, node_config: str) -> subprocess.Popen:
        return self._start(name, [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                                  "--root-certificates", str(self.certs / "ca.crt"),
                                  "--auth-supernode-private-key", str(private_key),
                                  "--node-config", node_config, "--port", str(free_port())])

    def run_app(self, run_config: Path) -> int:
        """``flwr run flower_app test -c run_config``; returns the run id."""
        result = self.flwr("run", str(REPO / "flower_app"), "test", "--run-config", str(run_config),
                           "--format", "json")
        if result.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{result.stdout}\n{result.stderr}")
        return int(json.loads(result.stdout)["run-id"])

    def run_status(self, run_id: int) -> str:
        result = self.flwr("ls", "test", "--run-id", str(run_id), "--format", "json")
        if result.returncode != 0:
            return ""
        return json.loads(result.stdout)["runs"][0]["status"]

    def wait_for_run(self, run_id: int, timeout: float, done_file: Path, during=None) -> str:
        """Wait until the run finishes; ``during()`` is called between polls (e.g. to kill a node).

        The ServerApp writes ``done_file`` last, so the file is watched and the SuperLink is asked
        (a ``flwr`` CLI call: a second of CPU) only every few seconds, to notice a failed run.
        """
        deadline = time.monotonic() + timeout
        next_status = time.monotonic() + 10
        while time.monotonic() < deadline:
            if during is not None:
                during()
            if done_file.exists() or time.monotonic() > next_status:
                status = self.run_status(run_id)
                if status.startswith("finished"):
                    return status
                next_status = time.monotonic() + (1 if done_file.exists() else 10)
            time.sleep(0.1)
        raise TimeoutError(f"run {run_id} did not finish in {timeout:.0f}s; SuperLink log:\n"
                           + self.log("superlink")[-4000:])
