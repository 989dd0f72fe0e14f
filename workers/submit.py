"""Producing a job the way queue-job does: a CONTRACT.md payload, its `queued` record, one LPUSH.

Used by the CLI (`dual_orchestrator.py submit`) and the RYLA gateway (gateway/), so both enqueue
exactly like the live frontend. `enqueue` queues its commands on a pipeline and returns
`pipeline.execute()`: the reply with a `redis.Redis`, an awaitable with a `redis.asyncio.Redis`.
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from workers.config import Catalog
from workers.queue import JobRecords


def new_payload(catalog: Catalog, job_type: str, prompt: str, user_id: str, *, num_images: int | None = None,
                bucket: str | None = None, job_id: str | None = None, **inputs: Any) -> dict:
    """The payload queue-job pushes for `job_type` (which must be in the catalog), plus `inputs`
    (seed, initImage, referenceImages, params, ...: job_types.yaml's header lists them)."""
    spec = catalog.job_types[job_type]
    queue = catalog.queue_of(job_type)
    count = num_images or spec.default_images
    payload = {
        "jobId": job_id or str(uuid.uuid4()), "jobType": job_type, "userId": user_id, "prompt": prompt,
        "imageId": None, "videoId": None, "format": spec.content, "quality": spec.quality,
        "modelType": job_type, "modelVariant": spec.model, "isSDXL": spec.worker == "image",
        "numImages": count, "bucket": bucket or spec.default_bucket, "characterId": None,
        "metadata": {"num_images": count, "queue": queue},
        "timestamp": datetime.now(timezone.utc).isoformat(),
    }
    payload.update({key: value for key, value in inputs.items() if value is not None})
    return payload


def enqueue(client, catalog: Catalog, payload: dict, **record: Any):
    """Record the job as `queued` (plus `record` fields) and LPUSH it, in one transaction."""
    queue = catalog.queue_of(payload["jobType"])
    pipe = client.pipeline(transaction=True)
    JobRecords(client).update(payload["jobId"], pipe=pipe, status="queued", jobType=payload["jobType"],
                              userId=payload["userId"], queue=queue, **record)
    pipe.lpush(queue, json.dumps(payload))
    return pipe.execute()
