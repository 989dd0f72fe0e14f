"""The gateway's HTTP app: RYLA's endpoints in front of the daemon's queues.

    POST /{endpoint}       the request becomes a job (job_types.yaml `ryla`), queued like the CLI's;
                           200 with the output once done within GATEWAY_WAIT_SECONDS, else 303 to
                           /results/{jobId}. Errors: {"detail": ...} with 400, 404, 413, 501, 503.
    GET  /results/{jobId}  202 while the job runs, 200 with the output, 500 with the job's error.
    GET  /health           readiness of each endpoint's model (the workers' heartbeats).

An `Idempotency-Key` header makes a retried request join the job of the first one instead of
queueing another. The app is async throughout: a waiting request holds no thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from gateway.endpoints import GatewayError, job_inputs, parse_request
from gateway.results import MEDIA_TYPES, cost_headers, job_record, render, wait_for_job
from gateway.settings import GatewaySettings
from storage import Storage, StorageError
from workers.config import Catalog
from workers.job import JobRejected, parse_job
from workers.queue import JOB_RECORD_TTL, job_key
from workers.submit import enqueue, new_payload

log = logging.getLogger("gateway")
IDEMPOTENCY_NAMESPACE = uuid.UUID("6f0c6a52-5b7e-4d7a-9a52-2f6d1c1e9b11")
RESULT_WAIT_CAP = 20.0   # a GET on a result URL waits at most this long before answering 202


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or actually sent)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"the request body is {declared} bytes, over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"the request body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(catalog: Catalog, gateway: GatewaySettings, client, storage: Storage, gpu_type: str) -> FastAPI:
    """`client`: a redis.asyncio.Redis; `storage`: the workers' storage backend (make_storage)."""
    app = FastAPI(title="RYLA gateway", docs_url=None, redoc_url=None, openapi_url=None)
    body_limit = min(gateway.max_body_bytes, catalog.limits.payload_max_bytes)
    token = gateway.token.encode() if gateway.token else None

    @app.middleware("http")
    async def bearer_token(request: Request, call_next):
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                return JSONResponse({"detail": "missing or wrong bearer token"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError):
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    @app.exception_handler(redis.RedisError)
    async def redis_down(_request: Request, exc: redis.RedisError):
        log.warning("redis error: %s", exc)
        return JSONResponse({"detail": "the job queue (Redis) is unreachable; retry later"}, 503,
                            headers={"Retry-After": "5"})

    async def answer(job_id: str, record: dict) -> Response:
        status = record.get("status")
        if status == "completed":
            try:
                data = await asyncio.to_thread(render, storage, record, record["rylaOutput"],
                                               int(record.get("rylaFps") or 16))
            except StorageError as exc:
                raise GatewayError(502, f"could not read the job's output: {exc}") from None
            except (OSError, ValueError, KeyError, IndexError, RuntimeError) as exc:   # decoding, ffmpeg, a record without outputs
                log.exception("job %s: converting its output failed", job_id)
                raise GatewayError(500, f"could not convert the job's output: {type(exc).__name__}: {exc}"[:500]) from None
            headers = cost_headers(job_id, record, gateway.price_per_gpu_hour, gpu_type)
            return Response(data, media_type=MEDIA_TYPES[record["rylaOutput"]], headers=headers)
        if status == "failed":
            raise GatewayError(500, f"the job failed: {record.get('error') or 'no reason recorded'}",
                               {"X-Job-Id": job_id})
        return RedirectResponse(f"/results/{job_id}", status_code=303, headers={"X-Job-Id": job_id})

    @app.get("/results/{job_id}")
    async def result(job_id: str):
        record = await job_record(client, job_id)
        if "rylaOutput" not in record:
            raise GatewayError(404, f"no gateway job {job_id[:80]}")
        record = await wait_for_job(client, job_id, min(gateway.wait_seconds, RESULT_WAIT_CAP))
        if record.get("status") in ("completed", "failed"):
            return await answer(job_id, record)
        progress = {k: record[k] for k in ("status", "phase", "step", "steps") if k in record}
        return JSONResponse({"jobId": job_id, **progress}, 202,
                            headers={"Location": f"/results/{job_id}", "Retry-After": "1"})

    @app.get("/health")
    async def health():
        return await readiness(catalog, client, gpu_type)

    @app.post("/{endpoint}")
    async def generate(endpoint: str, request: Request):
        entry = catalog.ryla.get(endpoint)
        if entry is None:
            raise GatewayError(404, f"unknown endpoint /{endpoint[:80]}")
        spec = catalog.job_type(entry.job_type) if entry.job_type else None
        if spec is None:
            raise GatewayError(501, f"/{endpoint} is not served by this pod: it needs {entry.needs}")
        try:
            body = json.loads(await read_body(request, body_limit))
        except (ValueError, RecursionError):
            raise GatewayError(400, "the request body is not valid JSON") from None
        ryla = parse_request(body)
        if entry.lora_required and not (ryla.lora_id or ryla.lora_name):
            raise GatewayError(400, f"/{endpoint} needs a LoRA: give lora_id or lora_name")
        inputs = job_inputs(catalog, spec, ryla, gateway.loras_dir)
        if ryla.trigger_word and "loras" in inputs and ryla.trigger_word not in ryla.prompt:
            ryla.prompt = f"{ryla.trigger_word}, {ryla.prompt}"   # what RYLA's LoRA endpoints do
        queue = catalog.queue_of(spec.name)
        key = request.headers.get("idempotency-key")
        job_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{endpoint}\n{key}")) if key else str(uuid.uuid4())
        marker = f"gateway:idempotency:{job_id}"
        joins = bool(key) and bool(await client.exists(marker))   # a retry joins its job, full queue or not
        waiting = await client.llen(queue)
        if waiting >= gateway.max_queue_depth and not joins:
            raise GatewayError(503, f"{waiting} jobs are waiting for {queue}; retry later",
                               {"Retry-After": str(max(1, round(spec.expected_seconds)))})
        payload = new_payload(catalog, spec.name, ryla.prompt, gateway.user_id, num_images=1, job_id=job_id, **inputs)
        try:
            parse_job(payload, catalog)       # the worker's own checks, prompt policy included
        except JobRejected as exc:
            raise GatewayError(400, exc.reason) from None
        # A retried request with the same key joins the first one's job (SET NX: one enqueue per key).
        if not key or await client.set(marker, "1", nx=True, ex=JOB_RECORD_TTL):
            try:
                await enqueue(client, catalog, payload, rylaEndpoint=endpoint, rylaOutput=entry.output,
                              rylaFps=ryla.fps or spec.fps or 16)
            except BaseException:   # not queued: a retry with this key must queue it, not wait for nothing
                if key:
                    with contextlib.suppress(redis.RedisError):   # unreachable: keep it, the job may be queued
                        if not await client.exists(job_key(job_id)):
                            await client.delete(marker)
                raise
            log.info("/%s: job %s queued on %s", endpoint, job_id, queue)
        return await answer(job_id, await wait_for_job(client, job_id, gateway.wait_seconds))

    return app


def serves(state: str | None) -> bool:
    """A worker's model state ("loaded", "resident, …", "warm …", "not loaded" under residency: loads
    on demand) serves jobs unless it is "unavailable: why"."""
    return state is not None and not state.startswith("unavailable")


async def readiness(catalog: Catalog, client, gpu_type: str) -> JSONResponse:
    """Each endpoint: served (its job type is in the catalog) and ready (a live worker can run its model)."""
    models: dict[str, str] = {}
    for worker in catalog.workers.values():
        for member in await client.smembers(f"{worker.queue}:workers"):
            beat = await client.get(f"worker:{member.decode()}")
            for key, state in (json.loads(beat).get("models") or {}).items() if beat else ():
                if not serves(models.get(key)):
                    models[key] = state
    missing = "no live worker has loaded it"
    endpoints = {}
    for name, entry in catalog.ryla.items():
        spec = catalog.job_type(entry.job_type) if entry.job_type else None
        if spec is None:
            endpoints[name] = {"served": False, "ready": False, "needs": entry.needs}
            continue
        state = models.get(spec.model)
        endpoints[name] = {"served": True, "ready": serves(state), "job_type": spec.name, "model": spec.model,
                           **({} if serves(state) else {"detail": state or missing})}
    served = {e["model"] for e in endpoints.values() if e["served"]}
    report = {key: models.get(key, missing) for key in sorted(served)}
    ready = all(serves(models.get(key)) for key in served)
    return JSONResponse({"status": "ready" if ready else "degraded", "gpu_type": gpu_type, "models": report,
                         "endpoints": endpoints}, 200 if ready else 503)
