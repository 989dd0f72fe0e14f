"""What every scenario reports: submitted, completed, failed with reason, lost, completed twice, time.

The jobs record is what the frontend sees. Local mode: DATA_DIR/jobs/{jobId}.json (LocalStatusSink,
with the history of statuses it applied) and callbacks.jsonl (every callback received). Supabase mode:
the callbacks the stand-in received; the live job-callback is monotonic (the first terminal status
of a job sticks), so that one is the job's outcome. "Completed twice" counts jobs whose record
turned completed more than once, or that were reported completed by two different runs (two
different completed bodies). The same body delivered again (the outbox resends after a crash or a
timeout; receivers ignore repeats) is reported as a repeated delivery.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import redis

TERMINAL = ("completed", "failed")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"-?\d[\d.e+]*\d|-\d")


def reason_kind(message: str) -> str:
    """A failure message with ids, quoted values and numbers blanked, to group like with like."""
    text = _QUOTED.sub("'…'", _UUID.sub("<id>", message or "(no message)"))
    return _NUMBER.sub("N", text)[:140]


def local_callbacks(data_dir: Path) -> dict[str, list[dict]]:
    by_job: dict[str, list[dict]] = {}
    path = Path(data_dir) / "jobs" / "callbacks.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            body = json.loads(line)
            body.pop("receivedAt", None)
            by_job.setdefault(body.get("jobId"), []).append(body)
    return by_job


def local_history(data_dir: Path, job_ids: Iterable[str]) -> dict[str, list[str]]:
    """jobId → the statuses the local jobs record applied, in order."""
    out = {}
    for job_id in job_ids:
        path = Path(data_dir) / "jobs" / f"{job_id}.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        out[job_id] = [h.get("status") for h in record.get("history", [])]
    return out


def standin_callbacks(cloud) -> dict[str, list[dict]]:
    by_job: dict[str, list[dict]] = {}
    with cloud.lock:
        for body in cloud.callbacks:
            by_job.setdefault(body.get("jobId"), []).append(dict(body))
    return by_job


def statuses(client: redis.Redis, job_ids: list[str]) -> dict[str, str | None]:
    out = {}
    for start in range(0, len(job_ids), 2000):
        chunk = job_ids[start:start + 2000]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hget(f"job:{job_id}", "status")
        out.update({j: (v.decode() if v else None) for j, v in zip(chunk, pipe.execute())})
    return out


def wait_settled(client: redis.Redis, job_ids: list[str], timeout: float, receipts: Callable[[], dict],
                 also: Callable[[], bool] = lambda: True, poll: float = 0.2) -> bool:
    """Until every job's Redis record is terminal, every job's terminal callback was received
    (`receipts()`: jobId → bodies) and `also()` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = all(s in TERMINAL for s in statuses(client, job_ids).values())
            if done:
                received = receipts()
                done = all(any(b.get("status") in TERMINAL for b in received.get(j, ())) for j in job_ids)
            if done and also():
                return True
        except redis.ConnectionError:
            pass  # the scenario may be restarting Redis
        time.sleep(poll)
    return False


@dataclass
class Figures:
    scenario: str
    config: str
    submitted: int = 0
    completed: int = 0
    failed: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    completed_twice: list[str] = field(default_factory=list)
    repeats: int = 0                    # completed callbacks delivered again with the same body
    seconds: float = 0.0
    notes: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    outcomes: dict = field(default_factory=dict, repr=False)   # jobId → its first terminal callback

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def require(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    def render(self, reasons: int = 10) -> str:
        twice = f"{len(self.completed_twice)}"
        if self.repeats:
            twice += f" (plus {self.repeats} repeated delivery(ies) of the same completed callback, ignored by the receiver)"
        lines = [f"== {self.scenario} [{self.config}] ==",
                 f"  submitted        {self.submitted}",
                 f"  completed        {self.completed}",
                 f"  failed           {self.failed_total}"]
        for kind, count in self.failed.most_common(reasons):
            lines.append(f"    {count:>6} × {kind}")
        if len(self.failed) > reasons:
            lines.append(f"    ... and {len(self.failed) - reasons} more kinds of reason")
        lines += [f"  lost             {len(self.lost)}" + (f"  e.g. {self.lost[:3]}" if self.lost else ""),
                  f"  completed twice  {twice}",
                  f"  time             {self.seconds:.1f} s"]
        lines += [f"  {key:<16} {value}" for key, value in self.notes.items()]
        lines.append("  result           " + ("OK" if not self.problems else "PROBLEMS:"))
        lines += [f"    - {problem}" for problem in self.problems]
        return "\n".join(lines)


def tally(figures: Figures, job_ids: Iterable[str], client: redis.Redis, callbacks: dict[str, list[dict]],
          history: dict[str, list[str]] | None = None) -> Figures:
    """Fill the job figures from the jobs record and check it against the Redis job records.
    `callbacks`: the bodies received per job; `history`: the local jobs record's statuses (local mode)."""
    job_ids = list(job_ids)
    figures.submitted = len(job_ids)
    records = statuses(client, job_ids)
    for job_id in job_ids:
        bodies = callbacks.get(job_id, [])
        terminal = [b for b in bodies if b.get("status") in TERMINAL]
        if not terminal or records[job_id] not in TERMINAL:
            figures.lost.append(job_id)
            continue
        first = figures.outcomes[job_id] = terminal[0]
        if first["status"] == "completed":
            figures.completed += 1
        else:
            figures.failed[reason_kind(first.get("errorMessage", ""))] += 1
        if records[job_id] != first["status"]:
            figures.problems.append(f"job {job_id}: the record says {records[job_id]}, the frontend saw {first['status']}")
        if len({b["status"] for b in terminal}) > 1:
            figures.problems.append(f"job {job_id} was reported both completed and failed")
        done = [b for b in terminal if b["status"] == "completed"]
        distinct = {json.dumps(b, sort_keys=True) for b in done}
        figures.repeats += len(done) - len(distinct)
        if len(distinct) > 1 or (history is not None and history.get(job_id, []).count("completed") > 1):
            figures.completed_twice.append(job_id)
    figures.require(not figures.lost, f"{len(figures.lost)} job(s) lost")
    figures.require(not figures.completed_twice, f"{len(figures.completed_twice)} job(s) completed twice")
    return figures


def settle_local(fig: Figures, daemon, job_ids: list[str], timeout: float, also: Callable[[], bool] = lambda: True) -> None:
    """wait_settled for a daemon in local mode (its jobs record under DATA_DIR/jobs)."""
    settled = wait_settled(daemon.client, job_ids, timeout, lambda: local_callbacks(daemon.data_dir), also)
    fig.require(settled, "jobs still open at the deadline")


def tally_local(fig: Figures, daemon, job_ids: list[str]) -> Figures:
    tally(fig, job_ids, daemon.client, local_callbacks(daemon.data_dir), local_history(daemon.data_dir, job_ids))
    pending = daemon.client.hlen("callbacks:pending")
    if pending:   # delivered once already; the outbox resends after its grace period, and the record ignores it
        fig.notes["outbox"] = f"{pending} callback(s) of killed workers still queued for a (repeated) delivery"
    return fig
