// queue-job against a real PostgreSQL (all migrations) and a real redis-server.
import { assert, assertEquals, assertStrictEquals } from "./assert.ts";
import { closeAll, createUser, JWT_SECRET, post, redis, REDIS_URL, reset, sql, test, userToken } from "./helpers.ts";
import { createQueueJobHandler } from "../../edge_functions/queue-job/handler.ts";
import { JOB_TYPES, LIMITS } from "../../edge_functions/_shared/job_types.ts";
import { type QueueClient, TcpRedisQueue } from "../../edge_functions/_shared/queue.ts";
import { REASONS } from "../../edge_functions/_shared/prompt_policy.ts";

const URL_ = "http://localhost/functions/v1/queue-job";
const queue = new TcpRedisQueue(REDIS_URL);
const handler = createQueueJobHandler({ sql, queue, jwtSecret: JWT_SECRET });
const PNG_1PX = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

async function call(body: unknown, token?: string | null, h = handler) {
  const headers: Record<string, string> = token === null ? {} : { Authorization: `Bearer ${token}` };
  const response = await h(post(URL_, body, headers));
  return { status: response.status, body: await response.json(), headers: response.headers };
}

async function listItems(name: string): Promise<Record<string, unknown>[]> {
  return (await redis.lRange(name, 0, -1)).map((item: string) => JSON.parse(item));
}

async function jobCount(): Promise<number> {
  const [{ n }] = await sql`select count(*)::int as n from public.jobs`;
  return n;
}

test("a valid request inserts the row and LPUSHes the exact CONTRACT payload", async () => {
  await reset();
  const user = await createUser();
  const before = Date.now();
  const res = await call({ jobType: "sdxl_image_fast", prompt: "a lighthouse at dawn", metadata: { source: "ui" },
    characterId: "0b7e7d51-6d8d-4d0a-9a7e-3f3c1c1f0a01", seed: 42, negativePrompt: "blurry" }, await userToken(user));
  assertStrictEquals(res.status, 200, JSON.stringify(res.body));
  assertStrictEquals(res.headers.get("access-control-allow-origin"), "*");
  const [row] = await sql`select * from public.jobs where id = ${res.body.jobId}`;
  assertEquals([row.user_id, row.job_type, row.status, row.worker_type, row.queue, row.format, row.quality, row.max_attempts],
    [user, "sdxl_image_fast", "queued", "SDXL", "sdxl_queue", "image", "fast", 3]);
  assertStrictEquals(row.metadata.prompt, "a lighthouse at dawn");
  const [payload] = await listItems("sdxl_queue");
  assert(Date.parse(payload.timestamp as string) >= before - 1000);
  delete payload.timestamp;
  assertEquals(payload, {
    jobId: row.id, jobType: "sdxl_image_fast", userId: user, prompt: "a lighthouse at dawn",
    imageId: null, videoId: null, format: "image", quality: "fast", modelType: "sdxl_image_fast",
    modelVariant: "lustify_sdxl", isSDXL: true, numImages: 6, bucket: "sdxl_image_fast",
    characterId: "0b7e7d51-6d8d-4d0a-9a7e-3f3c1c1f0a01",
    metadata: { source: "ui", num_images: 6, queue: "sdxl_queue", bucket: "sdxl_image_fast" },
    seed: 42, negativePrompt: "blurry",
  });
  assertEquals(await listItems("wan_queue"), []);
  assertEquals([res.body.status, res.body.queuePosition, res.body.estimatedTime, res.body.workerType, res.body.queue],
    ["queued", 1, JOB_TYPES.sdxl_image_fast.expectedSeconds, "SDXL", "sdxl_queue"]);
  assertStrictEquals(res.body.job.id, row.id);
});

test("every job type goes to its queue; positions count per queue", async () => {
  await reset();
  const token = await userToken(await createUser());
  const seen: Record<string, number> = {};
  for (const [name, spec] of Object.entries(JOB_TYPES)) {
    const body: Record<string, unknown> = { jobType: name, prompt: "a cat" };
    if (spec.mode === "img2img") Object.assign(body, { initImage: PNG_1PX, strength: 0.5 });
    if (spec.mode === "img2video") Object.assign(body, { referenceImage: PNG_1PX });
    if (spec.mode === "ref2video") Object.assign(body, { referenceImages: [PNG_1PX, PNG_1PX] });
    if (spec.mode === "edit") Object.assign(body, { referenceImages: [PNG_1PX] });
    if (spec.mode === "inpaint") Object.assign(body, { initImage: PNG_1PX, maskImage: PNG_1PX });
    const res = await call(body, token);
    assertStrictEquals(res.status, 200, `${name}: ${JSON.stringify(res.body)}`);
    seen[spec.queue] = (seen[spec.queue] ?? 0) + 1;
    assertStrictEquals(res.body.queuePosition, seen[spec.queue], name);
    assertStrictEquals(res.body.workerType, spec.workerType);
    const [payload] = await listItems(spec.queue); // LPUSH: newest on the left
    assertEquals([payload.jobType, payload.numImages, payload.bucket, payload.isSDXL, payload.format],
      [name, spec.defaultImages, spec.buckets[0], spec.workerType === "SDXL", spec.content]);
  }
  const total = Object.values(seen).reduce((a, b) => a + b, 0);
  assertStrictEquals(await jobCount(), total);
});

test("numImages, bucket and img2img inputs are passed on", async () => {
  await reset();
  const token = await userToken(await createUser());
  let res = await call({ jobType: "sdxl_image_high", prompt: "x", metadata: { num_images: 2 }, bucket: "sdxl_high" }, token);
  assertStrictEquals(res.status, 200);
  let [payload] = await listItems("sdxl_queue");
  assertEquals([payload.numImages, (payload.metadata as Record<string, unknown>).num_images, payload.bucket], [2, 2, "sdxl_high"]);
  res = await call({ jobType: "sdxl_img2img", prompt: "x", initImage: "https://example.test/a.png", strength: 0.3 }, token);
  assertStrictEquals(res.status, 200);
  [payload] = await listItems("sdxl_queue");
  assertEquals([payload.initImage, payload.strength], ["https://example.test/a.png", 0.3]);
});

test("image-to-video, reference-to-video and numFrames inputs are passed on", async () => {
  await reset();
  const token = await userToken(await createUser());
  let res = await call({ jobType: "video_i2v_fast", prompt: "x", referenceImage: PNG_1PX, numFrames: 49 }, token);
  assertStrictEquals(res.status, 200, JSON.stringify(res.body));
  let [payload] = await listItems("wan_queue");
  assertEquals([payload.referenceImage, payload.numFrames, payload.initImage], [PNG_1PX, 49, undefined]);
  res = await call({ jobType: "video_i2v_high", prompt: "x", initImage: "https://example.test/a.png" }, token);
  assertStrictEquals(res.status, 200, JSON.stringify(res.body));
  [payload] = await listItems("wan_queue");
  assertEquals([payload.initImage, payload.referenceImage], ["https://example.test/a.png", undefined]);
  res = await call({ jobType: "video_r2v", prompt: "x", metadata: { referenceImages: [PNG_1PX, "https://example.test/b.png"] } }, token);
  assertStrictEquals(res.status, 200, JSON.stringify(res.body));
  [payload] = await listItems("wan_queue");
  assertEquals(payload.referenceImages, [PNG_1PX, "https://example.test/b.png"]);
  res = await call({ jobType: "video_r2v", prompt: "x", referenceImage: PNG_1PX }, token);
  [payload] = await listItems("wan_queue");
  assertEquals([res.status, payload.referenceImages], [200, [PNG_1PX]]);
});

test("image inputs given in metadata are queued once, at the top level, and never stored in the row", async () => {
  await reset();
  const token = await userToken(await createUser());
  const res = await call({ jobType: "video_r2v", prompt: "x", metadata: { source: "ui", reference_images: [PNG_1PX] } }, token);
  assertStrictEquals(res.status, 200, JSON.stringify(res.body));
  const [payload] = await listItems("wan_queue");
  assertEquals([payload.referenceImages, payload.metadata], [[PNG_1PX], { source: "ui", num_images: 1, queue: "wan_queue", bucket: "video_high" }]);
  const [row] = await sql`select metadata from public.jobs where id = ${res.body.jobId}`;
  assert(!JSON.stringify(row.metadata).includes("base64"), JSON.stringify(row.metadata));
});

test("inputs too large for a queue item are refused (413) before anything is stored", async () => {
  await reset();
  const token = await userToken(await createUser());
  // Three pictures under the per-image limit whose payload, once wrapped, passes the worker's item limit.
  const chars = Math.floor((LIMITS.payloadMaxBytes - 240) / 3 / 4) * 4;
  const picture = "data:image/png;base64," + "A".repeat(chars - 22);
  const res = await call({ jobType: "video_r2v", prompt: "x", referenceImages: [picture, picture, picture] }, token);
  assertStrictEquals(res.status, 413, JSON.stringify(res.body).slice(0, 300));
  assert(res.body.error.includes(`over the ${LIMITS.payloadMaxBytes}-byte limit`), res.body.error);
  assertEquals([await jobCount(), (await listItems("wan_queue")).length], [0, 0]);
});

test("authentication failures are 401 and change nothing", async () => {
  await reset();
  const user = await createUser();
  const now = Math.floor(Date.now() / 1000);
  const cases: [string | null, string][] = [
    [null, "missing bearer token"],
    ["not-a-jwt", "malformed token"],
    [await userToken(user, { exp: now - 10 }), "token expired"],
    [await userToken(user, { role: "anon" }), "not a signed-in user"],
    [await userToken(user, { role: "service_role" }), "not a signed-in user"],
    [(await userToken(user)).slice(0, -3) + "abc", "invalid token signature"],
    [await userToken(crypto.randomUUID()), "unknown user"],
  ];
  for (const [token, error] of cases) {
    const res = await call({ jobType: "sdxl_image_fast", prompt: "x" }, token);
    assertEquals([res.status, res.body.error], [401, error]);
  }
  assertStrictEquals(await jobCount(), 0);
  assertEquals(await listItems("sdxl_queue"), []);
});

test("tokens signed with the project's ES256 signing key (SUPABASE_JWKS) are accepted", async () => {
  await reset();
  const user = await createUser();
  const pair = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
  const jwk = { ...(await crypto.subtle.exportKey("jwk", pair.publicKey)), kid: "key-1", alg: "ES256" };
  const b64 = (v: string | Uint8Array) => btoa(typeof v === "string" ? v : String.fromCharCode(...v))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const sign = async (kid: string, key = pair.privateKey) => {
    const now = Math.floor(Date.now() / 1000);
    const head = b64(JSON.stringify({ alg: "ES256", typ: "JWT", kid }));
    const body = b64(JSON.stringify({ sub: user, role: "authenticated", exp: now + 60 }));
    const sig = await crypto.subtle.sign({ name: "ECDSA", hash: "SHA-256" }, key, new TextEncoder().encode(`${head}.${body}`));
    return `${head}.${body}.${b64(new Uint8Array(sig))}`;
  };
  const es = createQueueJobHandler({ sql, queue, jwtSecret: null, jwks: [jwk] });
  assertStrictEquals((await call({ jobType: "image_fast", prompt: "x" }, await sign("key-1"), es)).status, 200);
  const other = await crypto.subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
  for (const token of [await sign("key-2"), await sign("key-1", other.privateKey), await userToken(user)]) {
    const res = await call({ jobType: "image_fast", prompt: "x" }, token, es);
    assertEquals([res.status, res.body.error], [401, "invalid token signature"]);
  }
});

test("bad inputs are 400 with a JSON error and change nothing", async () => {
  await reset();
  const token = await userToken(await createUser());
  const cases: [unknown, string][] = [
    ["{not json", "body must be JSON"],
    [[1, 2], "body must be a JSON object"],
    [{ prompt: "x" }, "jobType is required"],
    [{ jobType: "sdxl_ultra", prompt: "x" }, "unknown jobType"],
    [{ jobType: "__proto__", prompt: "x" }, "unknown jobType"],
    [{ jobType: "sdxl_image_fast" }, "prompt is required"],
    [{ jobType: "sdxl_image_fast", prompt: "x".repeat(LIMITS.promptMaxChars + 1) }, "over the"],
    [{ jobType: "sdxl_image_fast", prompt: "x", numImages: 0 }, "number of images"],
    [{ jobType: "sdxl_image_fast", prompt: "x", metadata: { num_images: LIMITS.maxImagesPerJob + 1 } }, "number of images"],
    [{ jobType: "video_fast", prompt: "x", numImages: 2 }, "between 1 and 1"],
    [{ jobType: "sdxl_image_fast", prompt: "x", numImages: 1.5 }, "must be an integer"],
    [{ jobType: "sdxl_image_fast", prompt: "x", bucket: "video_fast" }, "is not allowed"],
    [{ jobType: "sdxl_image_fast", prompt: "x", width: 2048 }, "renders width 1024"],
    [{ jobType: "sdxl_image_fast", prompt: "x", seed: -1 }, "seed"],
    [{ jobType: "sdxl_image_fast", prompt: "x", negativePrompt: 5 }, "negativePrompt"],
    [{ jobType: "sdxl_image_fast", prompt: "x", metadata: [] }, "metadata must be a JSON object"],
    [{ jobType: "sdxl_img2img", prompt: "x" }, "needs initImage"],
    [{ jobType: "sdxl_img2img", prompt: "x", initImage: "ftp://x/y.png" }, "must be an http(s) URL"],
    [{ jobType: "sdxl_img2img", prompt: "x", initImage: "data:image/gif;base64,R0lGOD==" }, "data:image/(png|jpeg|webp)"],
    [{ jobType: "sdxl_img2img", prompt: "x", initImage: PNG_1PX, strength: 1.5 }, "strength"],
    [{ jobType: "sdxl_image_fast", prompt: "x", initImage: PNG_1PX }, "takes no initImage"],
    [{ jobType: "sdxl_image_fast", prompt: "x", imageId: "nope" }, "imageId must be a UUID"],
    [{ jobType: "video_i2v_fast", prompt: "x" }, "needs referenceImage"],
    [{ jobType: "video_i2v_fast", prompt: "x", referenceImage: "ftp://x/y.png" }, "referenceImage must be an http(s) URL"],
    [{ jobType: "video_i2v_fast", prompt: "x", referenceImage: PNG_1PX, strength: 0.5 }, "takes no strength"],
    [{ jobType: "video_r2v", prompt: "x" }, "needs 1 to 3 referenceImages"],
    [{ jobType: "video_r2v", prompt: "x", referenceImages: [] }, "needs 1 to 3 referenceImages"],
    [{ jobType: "video_r2v", prompt: "x", referenceImages: [PNG_1PX, PNG_1PX, PNG_1PX, PNG_1PX] }, "needs 1 to 3"],
    [{ jobType: "video_r2v", prompt: "x", referenceImages: [PNG_1PX, "data:image/gif;base64,R0lGOD=="] }, "referenceImages[1]"],
    [{ jobType: "video_r2v", prompt: "x", initImage: PNG_1PX }, "not initImage"],
    [{ jobType: "video_fast", prompt: "x", numFrames: 6 }, "4k+1"],
    [{ jobType: "video_fast", prompt: "x", numFrames: 85 }, "numFrames must be between 5 and 81"],
    [{ jobType: "image_fast", prompt: "x", numFrames: 5 }, "takes no numFrames"],
    [{ jobType: "image_fast", prompt: "x", referenceImage: PNG_1PX, initImage: PNG_1PX }, "takes no initImage"],
  ];
  for (const [body, error] of cases) {
    const res = await call(body, token);
    assertStrictEquals(res.status, 400, `${JSON.stringify(body).slice(0, 80)} → ${res.status}`);
    assert(String(res.body.error).includes(error), `${JSON.stringify(body).slice(0, 80)}: ${res.body.error}`);
  }
  const huge = "A".repeat(Math.ceil((LIMITS.inputImageMaxBytes + 10) * 4 / 3 / 4) * 4);
  const res = await call({ jobType: "sdxl_img2img", prompt: "x", initImage: `data:image/png;base64,${huge}` }, token);
  assert(res.status === 400 && res.body.error.includes("byte limit"), res.body.error);
  assertStrictEquals(await jobCount(), 0);
  assertEquals(await listItems("sdxl_queue"), []);
});

test("prompts that sexualise minors are refused (422) before anything is stored", async () => {
  await reset();
  const token = await userToken(await createUser());
  for (const [prompt, reason] of [["nude ch1ld", REASONS.minor_sexual], ["loli", REASONS.forbidden],
    ["a 12 yo, lingerie", REASONS.minor_sexual]]) {
    const res = await call({ jobType: "sdxl_image_fast", prompt }, token);
    assertEquals([res.status, res.body.error, res.body.code], [422, reason, "prompt_refused"]);
  }
  const res = await call({ jobType: "sdxl_image_fast", prompt: "a fox" }, token,
    createQueueJobHandler({ sql, queue, jwtSecret: JWT_SECRET, classifier: (p) => Promise.resolve(p.includes("fox") ? "no foxes" : null) }));
  assertEquals([res.status, res.body.error], [422, "no foxes"]);
  assertStrictEquals(await jobCount(), 0);
});

test("a failed push marks the row failed with the reason, never leaves it queued", async () => {
  await reset();
  const token = await userToken(await createUser());
  const broken: QueueClient = { lpush: () => Promise.reject(new Error("connection refused")), close: () => Promise.resolve() };
  const res = await call({ jobType: "video_fast", prompt: "waves" }, token, createQueueJobHandler({ sql, queue: broken, jwtSecret: JWT_SECRET }));
  assertStrictEquals(res.status, 503);
  assert(res.body.error.includes("connection refused"));
  const [row] = await sql`select status, error_message, completed_at from public.jobs where id = ${res.body.jobId}`;
  assertEquals([row.status, row.error_message], ["failed", res.body.error]);
  assert(row.completed_at !== null);
  // A real dead Redis (nothing listens on the port) gives the same outcome, quickly.
  const dead = new TcpRedisQueue("redis://127.0.0.1:1/0");
  const res2 = await call({ jobType: "video_fast", prompt: "waves" }, token, createQueueJobHandler({ sql, queue: dead, jwtSecret: JWT_SECRET }));
  assertStrictEquals(res2.status, 503);
  const [row2] = await sql`select status from public.jobs where id = ${res2.body.jobId}`;
  assertStrictEquals(row2.status, "failed");
  await dead.close();
});

test("CORS preflight and other methods", async () => {
  const pre = await handler(new Request(URL_, { method: "OPTIONS" }));
  assertStrictEquals(pre.status, 200);
  assert(pre.headers.get("access-control-allow-headers")!.includes("authorization"));
  await pre.body?.cancel();
  const get = await handler(new Request(URL_));
  assertEquals([get.status, (await get.json()).error], [405, "use POST"]);
  await queue.close();
});

closeAll();
