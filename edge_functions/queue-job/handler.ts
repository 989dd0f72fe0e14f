// queue-job: a signed-in user asks for a generation. Validate against the generated job-type
// table, refuse prompts that sexualise minors, insert the jobs row, LPUSH the CONTRACT.md payload
// onto the type's queue, answer with the job, its queue position and estimated time.
// If the push fails the row is marked failed with the reason: it is never left queued.
import { bearer, verifyUserJwt } from "../_shared/auth.ts";
import { errorResponse, guarded, json, preflight } from "../_shared/cors.ts";
import { insertJob, markFailed, queueFigures, type Sql } from "../_shared/db.ts";
import { JOB_TYPES, type JobTypeSpec, LIMITS } from "../_shared/job_types.ts";
import { checkPrompt, type Classifier } from "../_shared/prompt_policy.ts";
import type { QueueClient } from "../_shared/queue.ts";

export interface QueueJobDeps {
  sql: Sql;
  queue: QueueClient;
  jwtSecret: string | null;
  jwks?: JsonWebKey[];
  classifier?: Classifier | null;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const DATA_IMAGE = /^data:image\/(png|jpeg|webp);base64,([A-Za-z0-9+/]+={0,2})$/;
const MAX_SEED = 2 ** 32 - 1;
// Image inputs the payload carries at its top level: left out of the metadata copy, so that a
// data: URI is neither queued twice nor stored in jobs.metadata.
const IMAGE_INPUTS = ["initImage", "init_image", "imageUrl", "maskImage", "mask_image", "mask", "referenceImage",
  "reference_image", "referenceImages", "reference_images"];
// jobId and timestamp, added to the payload after the row exists.
const PAYLOAD_ENVELOPE_BYTES = 128;

class BadRequest extends Error {}

type Body = Record<string, unknown>;

function pick(body: Body, meta: Body, ...names: string[]): unknown {
  for (const source of [body, meta]) {
    for (const name of names) if (source[name] !== undefined && source[name] !== null) return source[name];
  }
  return undefined;
}

function optionalUuid(value: unknown, what: string): string | null {
  if (value === undefined || value === null || value === "") return null;
  if (typeof value !== "string" || !UUID.test(value)) throw new BadRequest(`${what} must be a UUID`);
  return value;
}

function integer(value: unknown, what: string, lo: number, hi: number): number {
  if (typeof value !== "number" || !Number.isInteger(value)) throw new BadRequest(`${what} must be an integer`);
  if (value < lo || value > hi) throw new BadRequest(`${what} must be between ${lo} and ${hi}, got ${value}`);
  return value;
}

/** The validated request → the CONTRACT.md payload (without jobId) and the row's fields. */
export function buildJob(body: Body, userId: string) {
  const jobType = body.jobType;
  if (typeof jobType !== "string" || !jobType) throw new BadRequest("jobType is required");
  const spec: JobTypeSpec | undefined = Object.hasOwn(JOB_TYPES, jobType) ? JOB_TYPES[jobType] : undefined;
  if (!spec) throw new BadRequest(`unknown jobType ${JSON.stringify(jobType.slice(0, 60))} (known: ${Object.keys(JOB_TYPES).join(", ")})`);
  const rawMeta = body.metadata ?? {};
  if (typeof rawMeta !== "object" || Array.isArray(rawMeta)) throw new BadRequest("metadata must be a JSON object");
  const meta = rawMeta as Body;

  const prompt = pick(body, meta, "prompt");
  if (typeof prompt !== "string") throw new BadRequest("prompt is required (a string)");
  if (prompt.length > LIMITS.promptMaxChars) {
    throw new BadRequest(`prompt is ${prompt.length} characters, over the ${LIMITS.promptMaxChars}-character limit`);
  }
  const negativePrompt = pick(body, meta, "negativePrompt", "negative_prompt");
  if (negativePrompt !== undefined && (typeof negativePrompt !== "string" || negativePrompt.length > LIMITS.negativePromptMaxChars)) {
    throw new BadRequest(`negativePrompt must be a string of at most ${LIMITS.negativePromptMaxChars} characters`);
  }
  for (const [key, expected] of [["width", spec.width], ["height", spec.height]] as const) {
    const given = pick(body, meta, key);
    if (given !== undefined && given !== expected) throw new BadRequest(`${jobType} renders ${key} ${expected}, not ${given}`);
  }
  const count = meta.num_images ?? body.numImages;
  const numImages = count === undefined || count === null
    ? spec.defaultImages
    : integer(count, "number of images", 1, spec.maxImages);
  const bucket = pick(body, meta, "bucket") ?? spec.buckets[0];
  if (typeof bucket !== "string" || !spec.buckets.includes(bucket)) {
    throw new BadRequest(`bucket ${JSON.stringify(bucket)} is not allowed for ${jobType} (allowed: ${spec.buckets.join(", ")})`);
  }
  const seed = pick(body, meta, "seed");
  if (seed !== undefined) integer(seed, "seed", 0, MAX_SEED - numImages);

  const initImage = pick(body, meta, "initImage", "init_image", "imageUrl");
  let references: Body = {};
  const strength = pick(body, meta, "strength");
  if (spec.mode === "img2img" || spec.mode === "inpaint") {
    if (typeof initImage !== "string" || !initImage) throw new BadRequest(`${jobType} needs initImage (an https URL or a data:image/... base64 URI)`);
    checkImageInput(initImage);
    if (strength !== undefined && (typeof strength !== "number" || !(strength > 0 && strength <= 1))) {
      throw new BadRequest("strength must be a number in (0, 1]");
    }
    if (spec.mode === "inpaint") {
      const mask = pick(body, meta, "maskImage", "mask_image", "mask");
      if (typeof mask !== "string" || !mask) throw new BadRequest(`${jobType} needs maskImage (an https URL or a data:image/... base64 URI)`);
      checkImageInput(mask, "maskImage");
      references = { maskImage: mask };
    }
  } else if (spec.mode === "img2video" || spec.mode === "ref2video" || spec.mode === "edit") {
    references = checkReferences(jobType, spec.mode, body, meta, initImage, strength);
  } else if (initImage !== undefined || strength !== undefined) {
    throw new BadRequest(`${jobType} takes no initImage or strength`);
  }
  const numFrames = pick(body, meta, "numFrames", "num_frames");
  if (numFrames !== undefined) {
    if (spec.content !== "video" || spec.frames === null) throw new BadRequest(`${jobType} takes no numFrames`);
    integer(numFrames, "numFrames", 5, spec.frames);
    if (((numFrames as number) - 1) % 4 !== 0) {
      throw new BadRequest(`numFrames must be 4k+1 (5, 9, ..., ${spec.frames}) for Wan, got ${numFrames}`);
    }
  }

  const imageId = optionalUuid(body.imageId, "imageId");
  const videoId = optionalUuid(body.videoId, "videoId");
  const projectId = optionalUuid(pick(body, meta, "projectId", "project_id"), "projectId");
  const characterId = optionalUuid(pick(body, meta, "characterId", "character_id"), "characterId");
  const kept = Object.fromEntries(Object.entries(meta).filter(([key]) => !IMAGE_INPUTS.includes(key)));
  const metadata: Body = { ...kept, num_images: numImages, queue: spec.queue, bucket };
  const extras: Body = {};
  if (seed !== undefined) extras.seed = seed;
  if (negativePrompt !== undefined) extras.negativePrompt = negativePrompt;
  if (initImage !== undefined && spec.mode !== "edit") extras.initImage = initImage;   // edit: in referenceImages
  if (strength !== undefined) extras.strength = strength;
  if (numFrames !== undefined) extras.numFrames = numFrames;
  const loras = pick(body, meta, "loras");   // checked by the worker (files, allow-listed hosts, model family)
  if (loras !== undefined) {
    if (!Array.isArray(loras) || loras.length > LIMITS.maxLorasPerJob) throw new BadRequest(`loras must be a list of at most ${LIMITS.maxLorasPerJob} entries`);
    extras.loras = loras;
  }
  Object.assign(extras, references);
  const payload = {
    jobType, userId, prompt, imageId, videoId,
    format: spec.content, quality: spec.quality, modelType: jobType, modelVariant: spec.model,
    isSDXL: spec.workerType === "SDXL", numImages, bucket, characterId, metadata, ...extras,
  };
  return { spec, prompt, payload, projectId };
}

function checkImageInput(value: string, what = "initImage"): void {
  if (value.startsWith("https://") || value.startsWith("http://")) {
    try {
      new URL(value);
    } catch {
      throw new BadRequest(`${what} is not a valid URL`);
    }
    return;
  }
  const match = DATA_IMAGE.exec(value);
  if (!match) throw new BadRequest(`${what} must be an http(s) URL or a data:image/(png|jpeg|webp);base64 URI`);
  const decoded = Math.floor(match[2].length * 3 / 4) - (match[2].endsWith("==") ? 2 : match[2].endsWith("=") ? 1 : 0);
  if (decoded > LIMITS.inputImageMaxBytes) throw new BadRequest(`${what} is ${decoded} bytes, over the ${LIMITS.inputImageMaxBytes}-byte limit`);
}

/** Image-to-video: one referenceImage (initImage passes through as its alias). Reference-to-video:
 * referenceImages, 1 to LIMITS.maxReferenceImages (a single referenceImage is a list of one). */
function checkReferences(jobType: string, mode: string, body: Body, meta: Body, initImage: unknown, strength: unknown): Body {
  const single = pick(body, meta, "referenceImage", "reference_image");
  const list = pick(body, meta, "referenceImages", "reference_images");
  if (strength !== undefined) throw new BadRequest(`${jobType} takes no strength`);
  if (mode === "img2video") {
    if (list !== undefined) throw new BadRequest(`${jobType} takes one referenceImage, not referenceImages`);
    const image = single ?? initImage;
    if (typeof image !== "string" || !image) {
      throw new BadRequest(`${jobType} needs referenceImage (an https URL or a data:image/... base64 URI)`);
    }
    checkImageInput(image, "referenceImage");
    return single === undefined ? {} : { referenceImage: image };
  }
  if (initImage !== undefined && mode !== "edit") throw new BadRequest(`${jobType} takes referenceImages, not initImage`);
  const one = single ?? (mode === "edit" ? initImage : undefined);   // editing: initImage is a list of one
  const images = list ?? (one === undefined ? undefined : [one]);
  const max = LIMITS.maxReferenceImages;
  if (!Array.isArray(images) || images.length < 1 || images.length > max) {
    throw new BadRequest(`${jobType} needs 1 to ${max} referenceImages (https URLs or data:image/... base64 URIs)`);
  }
  images.forEach((image, i) => {
    if (typeof image !== "string" || !image) throw new BadRequest(`referenceImages[${i}] must be a string`);
    checkImageInput(image, `referenceImages[${i}]`);
  });
  return { referenceImages: images };
}

export function createQueueJobHandler(deps: QueueJobDeps): (req: Request) => Promise<Response> {
  return guarded(async (req) => {
    const pre = preflight(req);
    if (pre) return pre;
    if (req.method !== "POST") return errorResponse(405, "use POST");
    const auth = await verifyUserJwt(bearer(req), deps.jwtSecret, Date.now() / 1000, deps.jwks ?? []);
    if ("error" in auth) return errorResponse(401, auth.error);
    const userId = auth.claims.sub;

    const raw = await req.text();
    if (raw.length > LIMITS.payloadMaxBytes) return errorResponse(413, `request over ${LIMITS.payloadMaxBytes} bytes`);
    let body: unknown;
    try {
      body = JSON.parse(raw);
    } catch {
      return errorResponse(400, "body must be JSON");
    }
    if (typeof body !== "object" || body === null || Array.isArray(body)) return errorResponse(400, "body must be a JSON object");

    let job: ReturnType<typeof buildJob>;
    try {
      job = buildJob(body as Body, userId);
    } catch (err) {
      if (err instanceof BadRequest) return errorResponse(400, err.message);
      throw err;
    }
    // The worker dead-letters a queue item over this size unread: refuse it here, before the row exists.
    const size = new TextEncoder().encode(JSON.stringify(job.payload)).length + PAYLOAD_ENVELOPE_BYTES;
    if (size > LIMITS.payloadMaxBytes) {
      return errorResponse(413, `the job's inputs come to ${size} bytes, over the ${LIMITS.payloadMaxBytes}-byte limit`);
    }
    const refused = await checkPrompt(job.prompt, deps.classifier ?? null);
    if (refused) return errorResponse(422, refused, { code: "prompt_refused" });

    let row;
    try {
      row = await insertJob(deps.sql, {
        userId, jobType: job.payload.jobType, maxAttempts: job.spec.maxAttempts,
        metadata: { ...job.payload.metadata, prompt: job.prompt }, imageId: job.payload.imageId,
        videoId: job.payload.videoId, projectId: job.projectId, format: job.spec.content, quality: job.spec.quality,
      });
    } catch (err) {
      if ((err as { code?: string }).code === "23503") return errorResponse(401, "unknown user");
      throw err;
    }
    const payload = { jobId: row.id, ...job.payload, timestamp: new Date().toISOString() };
    try {
      await deps.queue.lpush(job.spec.queue, JSON.stringify(payload));
    } catch (err) {
      const reason = `could not queue the job: ${(err as Error).message}`;
      await markFailed(deps.sql, row.id, reason);
      return errorResponse(503, reason, { jobId: row.id, status: "failed" });
    }
    // The job is queued: a failing position query must not turn that into an error answer.
    const figures = await queueFigures(deps.sql, row.id)
      .catch(() => ({ queuePosition: null, estimatedTime: null, workerType: null, queue: null }));
    return json({
      success: true,
      jobId: row.id,
      status: row.status,
      job: row,
      queue: job.spec.queue,
      workerType: job.spec.workerType,
      queuePosition: figures.queuePosition,
      estimatedTime: figures.estimatedTime,
    });
  });
}
