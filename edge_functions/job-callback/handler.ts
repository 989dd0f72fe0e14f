// job-callback: the workers report progress and results. Only workers may call it (HMAC signature
// or the service key, see _shared/auth.ts). Status transitions are monotonic: queued → processing →
// completed|failed; a finished job never changes and a repeated callback is answered 200 unchanged.
// Body: {jobId, status: processing|completed|failed, imageUrls?, filePath?, outputUrl? (old name of
// filePath), errorMessage?} plus ignored extras (workerType...); `attempt` updates attempts. Kept
// in jobs.metadata: `bucket` (where the outputs are), `fallback` ({from, reason}: the job ran as its
// job type's fallback, so its outputs are in the fallback's bucket), `thumbnailPath` (a video's first
// frame, as thumbnail_path) and `seeds` (one per output).
import { type CallbackAuthConfig, verifyCallback } from "../_shared/auth.ts";
import { errorResponse, guarded, json, preflight } from "../_shared/cors.ts";
import { applyCallback, type CallbackUpdate, getJob, type Sql } from "../_shared/db.ts";

export interface JobCallbackDeps {
  sql: Sql;
  auth: CallbackAuthConfig;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const STATUSES = ["processing", "completed", "failed"] as const;
const MAX_BODY = 1_000_000;
const MAX_OUTPUTS = 64;
const MAX_ERROR_CHARS = 2000;

class BadBody extends Error {}

function outputPath(value: unknown, what: string): string {
  // A path inside the bucket, "{userId}/{filename}": relative, no "..", no empty segments.
  if (typeof value !== "string" || !value || value.length > 512) throw new BadBody(`${what} must be a non-empty path`);
  if (value.startsWith("/") || value.includes("\\") || value.split("/").some((s) => s === "" || s === "." || s === "..")) {
    throw new BadBody(`${what} must be a relative path inside the bucket, got ${JSON.stringify(value.slice(0, 80))}`);
  }
  return value;
}

export function parseCallback(body: unknown): CallbackUpdate {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new BadBody("body must be a JSON object");
  const b = body as Record<string, unknown>;
  if (typeof b.jobId !== "string" || !UUID.test(b.jobId)) throw new BadBody("jobId must be a UUID");
  if (!STATUSES.includes(b.status as typeof STATUSES[number])) {
    throw new BadBody(`status must be one of ${STATUSES.join(", ")}`);
  }
  const status = b.status as CallbackUpdate["status"];
  const single = b.filePath ?? b.outputUrl;
  const filePath = single === undefined || single === null ? null : outputPath(single, "filePath");
  let imageUrls: string[] | null = null;
  if (b.imageUrls !== undefined && b.imageUrls !== null) {
    if (!Array.isArray(b.imageUrls) || b.imageUrls.length > MAX_OUTPUTS) throw new BadBody(`imageUrls must be an array of at most ${MAX_OUTPUTS} paths`);
    imageUrls = b.imageUrls.map((p, i) => outputPath(p, `imageUrls[${i}]`));
  }
  if (status === "completed" && !filePath && !imageUrls?.length) throw new BadBody("a completed job needs filePath or imageUrls");
  if (b.errorMessage !== undefined && b.errorMessage !== null && typeof b.errorMessage !== "string") {
    throw new BadBody("errorMessage must be a string");
  }
  const errorMessage = status === "failed" ? String(b.errorMessage || "the worker reported a failure").slice(0, MAX_ERROR_CHARS) : null;
  const metadata = callbackMetadata(b);
  const attempt = typeof b.attempt === "number" && Number.isInteger(b.attempt) && b.attempt >= 0 && b.attempt < 1000 ? b.attempt : null;
  return {
    jobId: b.jobId,
    status,
    // One output: it is both the file path and the list; several images: the first is the file path.
    filePath: filePath ?? imageUrls?.[0] ?? null,
    imageUrls: imageUrls ?? (filePath ? [filePath] : null),
    errorMessage,
    attempt,
    metadata,
  };
}

const BUCKET = /^[A-Za-z0-9_-]{1,63}$/;

function callbackMetadata(b: Record<string, unknown>): Record<string, unknown> | null {
  const out: Record<string, unknown> = {};
  if (b.thumbnailPath !== undefined && b.thumbnailPath !== null) out.thumbnail_path = outputPath(b.thumbnailPath, "thumbnailPath");
  // The seeds are informative: a malformed list is left out rather than refusing the result.
  if (Array.isArray(b.seeds) && b.seeds.length <= MAX_OUTPUTS && b.seeds.every((s) => Number.isSafeInteger(s) && s >= 0)) {
    out.seeds = b.seeds;
  }
  if (b.bucket !== undefined && b.bucket !== null) {
    if (typeof b.bucket !== "string" || !BUCKET.test(b.bucket)) throw new BadBody("bucket must be a bucket name");
    out.bucket = b.bucket;
  }
  if (b.fallback !== undefined && b.fallback !== null) {
    const f = b.fallback as Record<string, unknown>;
    if (typeof f !== "object" || Array.isArray(f) || typeof f.from !== "string" || !BUCKET.test(f.from)) {
      throw new BadBody("fallback must be {from: job type, reason: text}");
    }
    out.fallback = { from: f.from, reason: String(f.reason ?? "").slice(0, 300) };
  }
  return Object.keys(out).length ? out : null;
}

export function createJobCallbackHandler(deps: JobCallbackDeps): (req: Request) => Promise<Response> {
  return guarded(async (req) => {
    const pre = preflight(req);
    if (pre) return pre;
    if (req.method !== "POST") return errorResponse(405, "use POST");
    const raw = await req.text();
    const denied = await verifyCallback(req, raw, deps.auth);
    if (denied) return errorResponse(401, denied);
    if (raw.length > MAX_BODY) return errorResponse(413, `body over ${MAX_BODY} bytes`);
    let update: CallbackUpdate;
    try {
      update = parseCallback(JSON.parse(raw));
    } catch (err) {
      if (err instanceof SyntaxError) return errorResponse(400, "body must be JSON");
      if (err instanceof BadBody) return errorResponse(400, err.message);
      throw err;
    }
    const job = await getJob(deps.sql, update.jobId);
    if (!job) return errorResponse(404, `unknown jobId ${update.jobId}`);
    const thumbnail = update.metadata?.thumbnail_path as string | undefined;
    const outputs = [...(update.imageUrls ?? []), ...(update.filePath ? [update.filePath] : []), ...(thumbnail ? [thumbnail] : [])];
    const foreign = outputs.find((p) => !p.startsWith(`${job.user_id}/`));
    if (foreign) return errorResponse(400, `output ${JSON.stringify(foreign)} is not under the job owner's folder`);
    const row = await applyCallback(deps.sql, update);
    if (!row) {
      // Already completed/failed: harmless repeat or a late report; nothing changes.
      return json({ success: true, applied: false, jobId: job.id, status: job.status });
    }
    return json({ success: true, applied: true, jobId: row.id, status: row.status });
  });
}
