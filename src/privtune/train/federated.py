"""FedAvg over simulated clients, run by Flower's simulation engine (flwr >= 1.42).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (2017, https://arxiv.org/abs/1602.05629): every round the server sends the
current trainable parameters to a sample of clients, each trains on its own records and
sends its parameters back, and the server takes their mean weighted by record count.
What travels is exactly the parameters with ``requires_grad`` (the whole model under
fft, the adapter under LoRA and the other PEFT methods), so every method federates the
same way and the frozen base model never travels after the start.

The pieces are Flower's own (``flwr.simulation.run_simulation`` with a ``ServerApp``
and a ``ClientApp`` on the Message API, a subclass of Flower's ``FedAvg`` strategy,
Flower's clipping helpers); each client trains with privtune's one loop
(:func:`privtune.train.loop.train`), so DP-SGD, precision and out-of-memory handling
stay one code path. Three things are privtune's, and why:

- *The base model ships once.* Flower's Ray backend pickles the ``ClientApp`` with
  every message; the app therefore carries only a Ray object reference to a "kit"
  (the prepared model, the clients' tensors, their training plans), which each Ray
  actor fetches once and keeps.
- *Client-level DP sampling.* DP-FedAvg (McMahan et al., "Learning Differentially
  Private Recurrent Language Models", 2018, https://arxiv.org/abs/1710.06963) clips each
  client's update to ``clip_norm`` and adds N(0, sigma^2 clip^2) to their sum, divided
  by the *expected* number of clients q N. Flower's ``DifferentialPrivacyServerSideFixedClipping``
  samples a fixed number of clients per round and divides by it; privtune's
  accountant (:mod:`privtune.train.dp`) analyses Poisson sampling, so under
  ``client_dp`` every client joins a round independently with probability
  ``fraction_fit`` (a round nobody joins still releases noise, as the accountant
  assumes) and every client weighs the same (a record-count weight would let a big
  client exceed the sensitivity). The privacy unit is then the client. Which clients
  join and the noise come from two streams spawned from the run's seed
  (:mod:`privtune.train.streams`), or, under ``client_dp.secure_mode``, both from the OS
  CSPRNG: a seed is stored in the run's config, and whoever replays it recovers the
  clients of every round and subtracts the noise.
- *DP-SGD inside a client* (the ``dp-`` methods): each client runs DP-SGD locally with
  the loop's own accountant; its noise multiplier is derived once for all
  ``rounds x local_epochs`` of its data, and its epsilon is accounted over the rounds it
  actually took part in. That epsilon covers the client's own data, per person or per
  record as ``dp.unit`` says (resolved once, on the whole training set).

Clients are chosen by privtune's seeded stream, not Flower's ``random.sample``, and
by client rather than by Flower's node ids (random per run), so a seed repeats a run:
``int(fraction_fit x clients)`` of them per round without ``client_dp``. Non-private
clients of one round share a shuffle seed (their records differ anyway), which is what
makes FedAvg of identical clients equal to centralised training step for step; DP
clients draw their own noise.

The engine cannot nest in a Ray task (privtune's Ray executor): its actors would ask
the cluster for CPUs the run's own task already holds, so federated runs are refused
there with a one-line error; run them with the local executor.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from privtune.config import ClientDPSettings, FederatedSettings
from privtune.data.tokenize import EncodedDataset
from privtune.errors import PrivtuneError
from privtune.measures.efficiency import PeakMemory
from privtune.train import dp, streams
from privtune.train.loop import TrainPlan, plan_privacy, privacy_units, train
from privtune.train.precision import Runtime

INSTALL_FIX = "install the federated extra: pip install 'privtune[federated]'"


def _flwr():
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise PrivtuneError("federated fine-tuning needs Flower (flwr) with its simulation engine", INSTALL_FIX) from None


@dataclass
class ClientPrivacy:
    """What DP-FedAvg was run with, and the client-level (epsilon, delta) it gives."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    rounds: int
    delta: float
    accountant: str
    epsilon: float = math.nan
    secure_mode: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def plan_client_privacy(settings: ClientDPSettings, n_clients: int, sample_rate: float, rounds: int) -> ClientPrivacy:
    """The noise for ``target_epsilon`` (or the given noise) over ``rounds`` Poisson rounds."""
    delta = settings.delta if settings.delta is not None else 1.0 / (10 * n_clients)
    dp.check_dp_settings(n_records=n_clients, delta=delta, sample_rate=sample_rate, max_grad_norm=settings.clip_norm,
                         noise_multiplier=settings.noise_multiplier, accountant=settings.accountant)
    if settings.noise_multiplier is not None:
        sigma = settings.noise_multiplier
    else:
        sigma = dp.noise_for_target_epsilon(settings.target_epsilon, delta, sample_rate, rounds,
                                            accountant=settings.accountant)
    return ClientPrivacy(sigma, settings.clip_norm, sample_rate, rounds, delta, settings.accountant,
                         secure_mode=settings.secure_mode)


def local_plans(plan: TrainPlan, clients: list[EncodedDataset], rounds: int) -> list[TrainPlan]:
    """Each client's local plan; under DP-SGD its noise is fixed for all its rounds of training."""
    if plan.dp is None:
        return [plan] * len(clients)
    # ``auto`` is resolved once, on the whole training set, so every client protects the same unit.
    unit = dp.resolve_unit(plan.dp.unit, [r.individual for data in clients for r in data.records]
                           if plan.dp.unit == "auto" else None)
    plans = []
    for data in clients:
        setup = plan_privacy(plan.dp, privacy_units(data, unit), plan.batch_size, rounds * plan.epochs)
        settings = plan.dp.model_copy(update={"noise_multiplier": setup.noise_multiplier, "target_epsilon": None,
                                              "delta": setup.delta, "unit": setup.unit})
        plans.append(replace(plan, dp=settings))
    return plans


@dataclass
class FederatedResult:
    """What a federated training run did: rounds, communication, time, privacy."""

    seconds: float = 0.0
    client_seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    records: int = 0  # records trained on (forward and backward), summed over clients
    positions: int = 0  # positions computed, padding included (what FLOPs count)
    bytes_down: int = 0
    bytes_up: int = 0
    rounds: list[dict] = field(default_factory=list)
    participation: list[int] = field(default_factory=list)
    client_privacy: ClientPrivacy | None = None
    #: per client, DP-SGD inside it (``dp-`` methods): noise, sample rate, steps, unit, epsilon
    record_privacy: list[dict] | None = None
    #: per client, the most memory its local training added in its worker process (over
    #: the rounds it took part in; NaN if it never did), as :class:`PeakMemory` measures it
    client_peak_memory: list[float] = field(default_factory=list)


@dataclass
class _Kit:
    """What a client needs, shipped once per actor: the model, the data, the plans."""

    model: torch.nn.Module
    names: list[str]
    data: list[EncodedDataset]
    plans: list[TrainPlan]
    runtime: Runtime
    threads: int


_KITS: dict[str, _Kit] = {}  # per Ray actor: kit id -> kit


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def to_arrays(model: torch.nn.Module, names: list[str]):
    from flwr.app import ArrayRecord

    params = dict(model.named_parameters())
    return ArrayRecord(torch_state_dict={n: params[n].detach().float().cpu() for n in names})


def load_arrays(model: torch.nn.Module, names: list[str], arrays) -> None:
    state = arrays.to_torch_state_dict()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            params[n].copy_(state[n].to(params[n].device, params[n].dtype))


def client_seed(seed: int, server_round: int, client: int, private: bool) -> int:
    """The seed a client's training derives its streams from in a round; DP clients get
    their own, so their noise is independent (non-private ones share a round's shuffle)."""
    return streams.stream_seed(seed, streams.FED_CLIENT_TRAINING, server_round, client if private else 0)


def _client_app(kit_id: str, kit_ref, seed: int):
    """A ClientApp that carries only the kit's reference (it is pickled with every message)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def _client(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"client": int(context.node_config["partition-id"])})}),
                       reply_to=msg)

    @app.train()
    def _train(msg, context):
        import ray

        if kit_id not in _KITS:
            _KITS.clear()
            _KITS[kit_id] = ray.get(kit_ref)
        kit = _KITS[kit_id]
        torch.set_num_threads(kit.threads)
        kit.model.to(kit.runtime.device)
        client = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        load_arrays(kit.model, kit.names, msg.content["arrays"])
        plan = kit.plans[client]
        plan = replace(plan, seed=client_seed(seed, server_round, client, plan.dp is not None))
        try:
            with PeakMemory(kit.runtime.device) as memory:  # in this worker: the driver cannot see it
                result = train(kit.model, kit.data[client], plan, kit.runtime)
        except PrivtuneError as e:  # Flower keeps only the text: mark it as the user's to fix
            raise RuntimeError(f"PrivtuneError: {e.one_line()}") from None
        metrics = {"num-examples": len(kit.data[client]), "client": client, "steps": result.steps,
                   "tokens": result.tokens, "records": result.records, "positions": result.positions,
                   "seconds": result.seconds, "peak-memory-bytes": memory.peak_bytes}
        return Message(RecordDict({"arrays": to_arrays(kit.model, kit.names), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    return app


def clip_update(update: list[np.ndarray], clip_norm: float) -> float:
    """Scale ``update`` in place to an L2 norm of at most ``clip_norm`` (FlatClip of
    DP-FedAvg) and return its norm before clipping. A zero update clips to itself:
    Flower's ``clip_inputs_inplace`` divides by the norm and fails on it."""
    from flwr.supercore.differential_privacy import get_norm

    norm = get_norm(update)
    if norm > clip_norm:
        for array in update:
            array *= clip_norm / norm
    return norm


def _strategy(fed: FederatedSettings, n_clients: int, privacy: ClientPrivacy | None, seed: int,
              out: FederatedResult):
    """Flower's FedAvg, counting what it sends; Poisson sampling, clipping and noise under client DP."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    class PrivtuneFedAvg(FedAvg):
        def __init__(self):
            super().__init__(fraction_train=fed.fraction_fit, fraction_evaluate=0.0,
                             min_train_nodes=max(1, int(n_clients * fed.fraction_fit)),
                             min_available_nodes=n_clients)
            secure = privacy is not None and privacy.secure_mode
            self.choices = dp.make_noise_generator(seed, secure, stream=streams.FED_CLIENTS)
            self.noise = dp.make_noise_generator(seed, secure, stream=streams.FED_NOISE)
            self.nodes = None
            self.current = None
            self.started = 0.0

        def configure_train(self, server_round, arrays, config, grid):
            self.current, self.started = arrays, time.perf_counter()
            nodes = self._node_of_client(grid)
            config["server-round"] = server_round
            record = RecordDict({"arrays": arrays, "config": config})
            chosen = self._choose_clients()
            messages = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=nodes[c]) for c in chosen]
            out.bytes_down += arrays.count_bytes() * len(messages)
            out.rounds.append({"round": server_round, "clients": len(messages), "chosen": chosen,
                               "bytes_down": arrays.count_bytes() * len(messages)})
            return messages

        def _node_of_client(self, grid) -> dict[int, int]:
            """Flower numbers its nodes at random each run: ask every node its client once."""
            if self.nodes is None:
                node_ids, _ = sample_nodes(grid, n_clients, n_clients)
                asks = [Message(RecordDict({}), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
                self.nodes = {int(r.content["metrics"]["client"]): r.metadata.src_node_id
                              for r in grid.send_and_receive(asks)}
            return self.nodes

        def _choose_clients(self) -> list[int]:
            """int(fraction_fit x N) clients at random, or each with probability fraction_fit under client DP."""
            draws = self.choices.uniform(n_clients)
            if privacy is None:
                return sorted(torch.argsort(draws)[:self.min_train_nodes].tolist())
            return torch.nonzero(draws < privacy.sample_rate).flatten().tolist()

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            failed = [m.error.reason for m in replies if m.has_error()]
            if failed:
                reason = failed[0].split("PrivtuneError: ", 1)
                if len(reason) == 2:
                    raise PrivtuneError(reason[1].splitlines()[0])
                raise RuntimeError(f"a federated client failed: {failed[0]}")
            up = sum(m.content["arrays"].count_bytes() for m in replies)
            out.bytes_up += up
            for m in replies:
                metrics = m.content["metrics"]
                client = int(metrics["client"])
                out.participation[client] += 1
                out.client_peak_memory[client] = float(np.fmax(out.client_peak_memory[client],
                                                               metrics["peak-memory-bytes"]))
                out.steps += int(metrics["steps"])
                out.tokens += int(metrics["tokens"])
                out.records += int(metrics["records"])
                out.positions += int(metrics["positions"])
                out.client_seconds += float(metrics["seconds"])
            row = out.rounds[-1]
            row.update(bytes_up=up, seconds=time.perf_counter() - self.started)
            if privacy is None:
                return super().aggregate_train(server_round, replies)
            arrays, row["update_norms"] = self._noisy_mean(replies)
            return arrays, None

        def _noisy_mean(self, replies):
            """DP-FedAvg: current + (sum of clipped updates + N(0, (sigma C)^2)) / (q N)."""
            keys = list(self.current.keys())
            current = self.current.to_numpy_ndarrays()
            total = [np.zeros_like(a, dtype=np.float64) for a in current]
            norms = []
            for m in replies:
                update = [np.subtract(x, y) for x, y in zip(m.content["arrays"].to_numpy_ndarrays(), current)]
                norms.append(clip_update(update, privacy.clip_norm))
                for t, u in zip(total, update):
                    t += u
            scale = privacy.sample_rate * n_clients
            std = privacy.noise_multiplier * privacy.clip_norm
            new = [(c + (t + self.noise.gaussian(c.shape, std=std).double().numpy()) / scale).astype(c.dtype)
                   for c, t in zip(current, total)]
            return ArrayRecord(array_dict={k: Array(v) for k, v in zip(keys, new)}), norms

    return PrivtuneFedAvg()


def _inside_ray_task() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _backend_config(runtime: Runtime, n_clients: int) -> tuple[dict, int]:
    """Ray resources: the machine's CPUs shared among at most ``n_clients`` actors."""
    cpus = max(1, os.cpu_count() or 1)
    actors = min(n_clients, cpus)
    threads = max(1, cpus // actors)
    resources = {"num_cpus": threads, "num_gpus": 1.0 / actors if runtime.device.type == "cuda" else 0.0}
    init = {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    return {"client_resources": resources, "init_args": init}, threads


class _QuietFlower:
    """Flower logs every round at INFO (and its Python API's deprecation at WARNING): keep the study's output clean."""

    def __enter__(self):
        self.logger = logging.getLogger("flwr")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences Ray's FutureWarning about it

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def federated_train(model: torch.nn.Module, clients: list[EncodedDataset], plan: TrainPlan,
                    fed: FederatedSettings, runtime: Runtime, *,
                    on_round_end: Callable[[int, FederatedResult], None] = lambda r, result: None) -> FederatedResult:
    """Train ``model``'s trainable parameters in place by FedAvg over ``clients``.

    ``plan`` is one client's local schedule (``epochs`` = local epochs); ``on_round_end``
    sees the model after each round's aggregate (its time is not counted as training).

    Raises:
        PrivtuneError: flwr missing, inside a Ray task, a client with no records, or an
            impossible client_dp setting.
    """
    _flwr()
    import ray
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if _inside_ray_task():
        raise PrivtuneError("federated runs cannot start Flower's simulation engine inside a Ray task",
                            "run federated methods with the local executor (privtune run --executor local)")
    if any(len(c) == 0 for c in clients):
        raise PrivtuneError("a federated client holds no records", "use fewer federated.clients")
    n = len(clients)
    out = FederatedResult(participation=[0] * n, client_peak_memory=[math.nan] * n)
    if fed.client_dp is not None:
        out.client_privacy = plan_client_privacy(fed.client_dp, n, fed.fraction_fit, fed.rounds)
    plans = local_plans(plan, clients, fed.rounds)
    names = trainable_names(model)
    backend, threads = _backend_config(runtime, n)
    started_ray = not ray.is_initialized()
    kit = _Kit(copy.deepcopy(model).cpu(), names, clients, plans, runtime, threads)
    with _QuietFlower():
        if started_ray:
            ray.init(**backend["init_args"])
        kit_ref = ray.put(kit)
        del kit
        strategy = _strategy(fed, n, out.client_privacy, plan.seed, out)
        evaluating = [0.0]

        def evaluate(server_round, arrays):
            if server_round == 0:
                return
            began = time.perf_counter()
            load_arrays(model, names, arrays)
            if out.client_privacy is not None:
                p = out.client_privacy
                p.epsilon = dp.epsilon_for(p.noise_multiplier, p.delta, p.sample_rate, server_round, p.accountant)
            out.record_privacy = _record_privacy(plans, clients, out.participation)
            on_round_end(server_round, out)
            evaluating[0] += time.perf_counter() - began

        server = ServerApp()

        @server.main()
        def _main(grid, context):
            began = time.perf_counter()
            strategy.start(grid=grid, initial_arrays=to_arrays(model, names), num_rounds=fed.rounds,
                           evaluate_fn=evaluate)
            out.seconds = time.perf_counter() - began - evaluating[0]

        try:
            run_simulation(server_app=server, client_app=_client_app(uuid.uuid4().hex, kit_ref, plan.seed),
                           num_supernodes=n, backend_config=backend)
        finally:
            if started_ray:
                ray.shutdown()
    return out


def _record_privacy(plans: list[TrainPlan], clients: list[EncodedDataset], participation: list[int]) -> list[dict] | None:
    """Per client: epsilon of local DP-SGD (per record or per person) over the rounds it took part in.

    The sample rate and steps are the same for either unit (``train/dp/units.py``)."""
    if plans[0].dp is None:
        return None
    rows = []
    for p, data, rounds in zip(plans, clients, participation):
        q = min(1.0, p.batch_size / len(data))
        steps = rounds * p.epochs * math.ceil(len(data) / p.batch_size)
        rows.append({"noise_multiplier": p.dp.noise_multiplier, "sample_rate": q, "steps": steps,
                     "delta": p.dp.delta, "accountant": p.dp.accountant, "unit": p.dp.unit,
                     "epsilon": dp.epsilon_for(p.dp.noise_multiplier, p.dp.delta, q, steps, p.dp.accountant)})
    return rows
