"""Run targets as Ray tasks, with the same ladder: ``backend="ray"`` or ``RayBackend()``.

Needs the ``ray`` extra (``pip install "threadbridge[ray]"``); ``import threadbridge``
never imports Ray. The work runs on the cluster the program is connected to
(``ray.init()``, ``RAY_ADDRESS``), or on a local one that the first call starts, as Ray
itself does. The rungs:

* rung 1 sets the token that the remote target sees (``check_cancelled()``,
  ``cancel_requested()``, ``sleep()``, ``current_token()`` work inside the task), through
  a small control actor that a thread of the task listens to; a task still waiting for
  cluster resources is cancelled by Ray and never starts;
* rung 2 raises ``TargetCancelled`` inside the remote target: a signal to the task's own
  thread, so that it lands inside ``time.sleep()`` and other calls a signal interrupts;
* rung 3 is ``ray.cancel(ref, force=True)``: Ray kills the worker process (and what the
  target started), and the handle ends KILLED.

The await returns once Ray reports the task ended.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._backend import Backend
from .._ladder import Run
from ._lib import ray, unavailable
from ._work import RayWork, ensure_ray, guard_loop

__all__ = ["RayBackend"]


class RayBackend(Backend):
    """Run targets as Ray tasks, with the same ladder.

        await threadbridge.run_killable(train, data, backend=RayBackend(num_cpus=4))
        await threadbridge.run_killable(f, x, backend="ray")  # RayBackend()

    Args:
        num_cpus: CPUs each task reserves on the cluster.
        resources: other custom resources each task reserves, as for ``ray.remote``.
        runtime_env: the task's runtime environment, as for ``ray.remote``; the nodes
            need threadbridge installed (``{"pip": ["threadbridge"]}``).
        **options: any other option of ``.options()`` of a Ray task (``memory``,
            ``num_gpus``, ``scheduling_strategy``...). ``max_retries`` is always 0: a
            stopped task must not run again.

    The default limiter of a ``RayBackend`` allows as many calls at once as the cluster
    has CPUs for (measured on first use).
    """

    name = "ray"

    def __init__(
        self,
        num_cpus: float = 1,
        resources: Mapping[str, float] | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus < 0:
            raise ValueError(f"RayBackend: num_cpus must be a number >= 0, got {num_cpus!r}")
        if "max_retries" in options or "retry_exceptions" in options:
            raise ValueError(
                "RayBackend: max_retries and retry_exceptions are always off (a stopped "
                "task must not run again)"
            )
        self.options: dict[str, Any] = {
            **options,
            "num_cpus": num_cpus,
            "max_retries": 0,
            "retry_exceptions": False,
        }
        if resources is not None:
            self.options["resources"] = dict(resources)
        if runtime_env is not None:
            self.options["runtime_env"] = dict(runtime_env)
        self.num_cpus = num_cpus

    def __repr__(self) -> str:
        return f"RayBackend(num_cpus={self.num_cpus!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RayBackend) and other.options == self.options

    def __hash__(self) -> int:
        return hash(("RayBackend", self.num_cpus, repr(sorted(self.options.items()))))

    def check_platform(self, what: str) -> None:
        refusal = unavailable(what)
        if refusal is not None:
            raise refusal
        ensure_ray()

    def prepare(self, func: Callable[..., Any], args: tuple[Any, ...], name: str) -> bytes:
        dumps = ray.cloudpickle.dumps
        try:
            return dumps((func, args))  # type: ignore[no-any-return]
        except Exception as exc:
            error = exc
        for index, arg in enumerate(args, 1):
            try:
                dumps(arg)
            except Exception as exc:
                raise TypeError(
                    f"argument {index} to {name} ({type(arg).__qualname__} {arg!r:.60}) "
                    f'cannot be serialized for backend="ray": {exc}. Pass a picklable value'
                ) from None
        raise TypeError(f'{name} cannot be serialized for backend="ray": {error}') from None

    def start(self, run: Run, job: Any) -> RayWork:
        guard_loop(run)
        work = RayWork(run)
        run.attach(work)  # before the task is submitted: from here the ladder reaches it
        work.submit(self.options, job)
        return work

    def default_limit(self) -> int:
        ensure_ray()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        per_task = self.num_cpus or 1
        return max(1, int(cpus // per_task))
