// job-callback against a real PostgreSQL: authentication, validation, monotonic transitions.
import { assert, assertEquals, assertStrictEquals, assertThrows } from "./assert.ts";
import { CALLBACK_SECRET, closeAll, createUser, post, reset, SERVICE_KEY, signCallback, sql, test } from "./helpers.ts";
import { createJobCallbackHandler } from "../../edge_functions/job-callback/handler.ts";
import { type CallbackAuthConfig, callbackAuthFromEnv } from "../../edge_functions/_shared/auth.ts";

const URL_ = "http://localhost/functions/v1/job-callback";
const AUTH: CallbackAuthConfig = { serviceKey: SERVICE_KEY, callbackSecret: CALLBACK_SECRET, requireSignature: false };
const handler = createJobCallbackHandler({ sql, auth: AUTH });

async function newJob(jobType = "sdxl_image_fast"): Promise<{ id: string; user: string }> {
  const user = await createUser();
  const [row] = await sql`insert into public.jobs (user_id, job_type) values (${user}, ${jobType}) returning id`;
  return { id: row.id, user };
}

/** Signed like the live worker with CALLBACK_SECRET: bearer + timestamp + signature. */
async function send(body: unknown, opts: { headers?: Record<string, string>; sign?: boolean; h?: typeof handler } = {}) {
  const raw = typeof body === "string" ? body : JSON.stringify(body);
  const headers: Record<string, string> = opts.headers ?? { Authorization: `Bearer ${SERVICE_KEY}` };
  if (opts.sign !== false) Object.assign(headers, await signCallback(raw));
  const response = await (opts.h ?? handler)(post(URL_, raw, headers));
  return { status: response.status, body: await response.json() };
}

async function row(id: string) {
  const [r] = await sql`select * from public.jobs where id = ${id}`;
  return r;
}

test("processing, then completed with imageUrls; extras are ignored", async () => {
  await reset();
  const job = await newJob();
  let res = await send({ jobId: job.id, status: "processing", workerType: "SDXL", attempt: 1 });
  assertEquals([res.status, res.body.applied, res.body.status], [200, true, "processing"]);
  let r = await row(job.id);
  assert(r.started_at !== null && r.last_progress_at !== null && r.completed_at === null);
  assertStrictEquals(r.attempts, 1);
  const paths = [`${job.user}/${job.id}_0.png`, `${job.user}/${job.id}_1.png`];
  res = await send({ jobId: job.id, status: "completed", imageUrls: paths, seeds: [5, 6] });
  assertEquals([res.status, res.body.applied, res.body.status], [200, true, "completed"]);
  r = await row(job.id);
  assertEquals([r.status, r.file_path, r.image_urls], ["completed", paths[0], paths]);
  assert(r.completed_at !== null);
});

test("a job that ran as its fallback keeps the bucket and the reason in metadata", async () => {
  await reset();
  const job = await newJob();
  await sql`update public.jobs set metadata = '{"prompt": "kept"}'::jsonb where id = ${job.id}`;
  const path = `${job.user}/${job.id}_0.png`;
  const fallback = { from: "sdxl_image_fast", reason: "the image worker stopped for good" };
  const res = await send({ jobId: job.id, status: "completed", imageUrls: [path], bucket: "image_fast", fallback });
  assertEquals([res.status, res.body.applied], [200, true]);
  const r = await row(job.id);
  assertEquals(r.metadata, { prompt: "kept", bucket: "image_fast", fallback });
  for (const bad of [{ bucket: "../x" }, { fallback: "sdxl" }, { fallback: { reason: "no from" } }]) {
    const other = await newJob();
    const refused = await send({ jobId: other.id, status: "completed", filePath: `${other.user}/a.png`, ...bad });
    assertStrictEquals(refused.status, 400, JSON.stringify(bad));
  }
});

test("a video's thumbnail and the seeds are kept in metadata; a thumbnail outside the owner's folder is refused", async () => {
  await reset();
  const job = await newJob("video_fast");
  const [mp4, thumb] = [`${job.user}/${job.id}.mp4`, `${job.user}/${job.id}_thumb.jpg`];
  const res = await send({ jobId: job.id, status: "completed", filePath: mp4, thumbnailPath: thumb, seeds: [5], bucket: "video_fast" });
  assertEquals([res.status, res.body.applied], [200, true]);
  const r = await row(job.id);
  assertEquals([r.file_path, r.metadata.thumbnail_path, r.metadata.seeds], [mp4, thumb, [5]]);
  const other = await newJob("video_fast");
  const odd = await send({ jobId: other.id, status: "completed", filePath: `${other.user}/v.mp4`, seeds: ["x"] });
  assertEquals([odd.status, (await row(other.id)).metadata.seeds], [200, undefined]);   // informative only: left out
  const third = await newJob("video_fast");
  const foreign = await send({ jobId: third.id, status: "completed", filePath: `${third.user}/v.mp4`, thumbnailPath: `${job.user}/t.jpg` });
  assertStrictEquals(foreign.status, 400);
});

test("filePath and its old name outputUrl are accepted", async () => {
  await reset();
  for (const key of ["filePath", "outputUrl"]) {
    const job = await newJob("video_fast");
    const path = `${job.user}/${job.id}.mp4`;
    const res = await send({ jobId: job.id, status: "completed", [key]: path });
    assertStrictEquals(res.status, 200, JSON.stringify(res.body));
    const r = await row(job.id);
    assertEquals([r.status, r.file_path, r.image_urls, r.started_at], ["completed", path, [path], null]);
  }
});

test("failed stores the error message", async () => {
  await reset();
  const job = await newJob();
  const res = await send({ jobId: job.id, status: "failed", errorMessage: "CUDA out of memory" });
  assertStrictEquals(res.status, 200);
  const r = await row(job.id);
  assertEquals([r.status, r.error_message], ["failed", "CUDA out of memory"]);
});

test("transitions are monotonic and repeats are harmless", async () => {
  await reset();
  const job = await newJob();
  const path = `${job.user}/a.png`;
  assertStrictEquals((await send({ jobId: job.id, status: "completed", filePath: path })).body.applied, true);
  const first = await row(job.id);
  for (const body of [
    { jobId: job.id, status: "completed", filePath: `${job.user}/other.png` },
    { jobId: job.id, status: "processing" },
    { jobId: job.id, status: "failed", errorMessage: "late" },
  ]) {
    const res = await send(body);
    assertEquals([res.status, res.body.applied, res.body.status], [200, false, "completed"]);
  }
  const after = await row(job.id);
  assertEquals([after.status, after.file_path, after.error_message, after.completed_at],
    [first.status, first.file_path, null, first.completed_at]);

  const failed = await newJob();
  await send({ jobId: failed.id, status: "failed", errorMessage: "boom" });
  const res = await send({ jobId: failed.id, status: "completed", filePath: `${failed.user}/x.png` });
  assertEquals([res.status, res.body.applied, res.body.status], [200, false, "failed"]);
  assertStrictEquals((await row(failed.id)).file_path, null);

  const running = await newJob();
  await send({ jobId: running.id, status: "processing" });
  await send({ jobId: running.id, status: "processing", attempt: 2 });
  const r = await row(running.id);
  assertEquals([r.status, r.attempts], ["processing", 2]);
});

test("authentication: signature, service key, and the signature-only mode", async () => {
  await reset();
  const job = await newJob();
  const body = JSON.stringify({ jobId: job.id, status: "processing" });
  const old = Math.floor(Date.now() / 1000) - 301;
  const cases: [Record<string, string>, number, string | null][] = [
    [{}, 401, "missing credentials"],
    [{ Authorization: "Bearer wrong" }, 401, "invalid credentials"],
    [{ Authorization: `Bearer ${SERVICE_KEY}x` }, 401, "invalid credentials"],
    [{ Authorization: `Bearer ${SERVICE_KEY}`, ...(await signCallback(body, undefined, "other-secret")) }, 401, "invalid callback signature"],
    [{ ...(await signCallback(body, old)) }, 401, "callback signature expired"],
    [{ "X-Callback-Signature": "v1=00" }, 401, "missing or malformed X-Callback-Timestamp"],
    [{ ...(await signCallback(body)) }, 200, null], // signature alone
    [{ Authorization: `Bearer ${SERVICE_KEY}` }, 200, null], // the live workers' bearer form
  ];
  for (const [headers, status, error] of cases) {
    const res = await send(body, { headers, sign: false });
    assertEquals([res.status, res.body.error ?? null], [status, error], JSON.stringify(headers));
  }
  const strict = createJobCallbackHandler({ sql, auth: { ...AUTH, requireSignature: true } });
  let res = await send(body, { headers: { Authorization: `Bearer ${SERVICE_KEY}` }, sign: false, h: strict });
  assertEquals([res.status, res.body.error], [401, "callback signature required"]);
  res = await send(body, { h: strict });
  assertStrictEquals(res.status, 200);
  // A tampered body no longer matches its signature.
  const headers = { Authorization: `Bearer ${SERVICE_KEY}`, ...(await signCallback(body)) };
  const tampered = await handler(post(URL_, body.replace("processing", "failed"), headers));
  assertEquals([tampered.status, (await tampered.json()).error], [401, "invalid callback signature"]);
  // Signatures required without a secret would refuse every callback for good: the function does not start.
  const env = (vars: Record<string, string>) => ({ get: (key: string) => vars[key] });
  assertThrows(() => callbackAuthFromEnv(env({ CALLBACK_REQUIRE_SIGNATURE: "true", SUPABASE_SERVICE_KEY: "k" })),
    "CALLBACK_REQUIRE_SIGNATURE=true needs CALLBACK_SECRET");
  assertEquals(callbackAuthFromEnv(env({ CALLBACK_REQUIRE_SIGNATURE: "true", CALLBACK_SECRET: "s" })),
    { serviceKey: null, callbackSecret: "s", requireSignature: true });
});

test("unknown jobId is 404 and bad bodies are 400, each with a JSON error", async () => {
  await reset();
  const job = await newJob();
  const missing = await send({ jobId: crypto.randomUUID(), status: "processing" });
  assertStrictEquals(missing.status, 404);
  assert(missing.body.error.startsWith("unknown jobId"));
  const cases: [unknown, string][] = [
    ["{oops", "body must be JSON"],
    [[], "body must be a JSON object"],
    [{ status: "processing" }, "jobId must be a UUID"],
    [{ jobId: "../../etc", status: "processing" }, "jobId must be a UUID"],
    [{ jobId: job.id, status: "done" }, "status must be one of"],
    [{ jobId: job.id, status: "queued" }, "status must be one of"],
    [{ jobId: job.id, status: "completed" }, "needs filePath or imageUrls"],
    [{ jobId: job.id, status: "completed", imageUrls: "a.png" }, "imageUrls must be an array"],
    [{ jobId: job.id, status: "completed", filePath: `${job.user}/../x.png` }, "relative path"],
    [{ jobId: job.id, status: "completed", filePath: `/${job.user}/x.png` }, "relative path"],
    [{ jobId: job.id, status: "completed", imageUrls: [5] }, "non-empty path"],
    [{ jobId: job.id, status: "completed", filePath: `${crypto.randomUUID()}/x.png` }, "not under the job owner's folder"],
    [{ jobId: job.id, status: "failed", errorMessage: { nested: true } }, "errorMessage must be a string"],
  ];
  for (const [body, error] of cases) {
    const res = await send(body);
    assertStrictEquals(res.status, 400, `${JSON.stringify(body)} → ${res.status}`);
    assert(String(res.body.error).includes(error), `${JSON.stringify(body)}: ${res.body.error}`);
  }
  assertStrictEquals((await row(job.id)).status, "queued");
});

closeAll();
