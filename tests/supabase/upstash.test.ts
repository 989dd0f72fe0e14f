// Upstash REST mode, against a local stand-in of the REST API that checks the request shape
// (POST, bearer token, JSON command array) and executes the command on the real redis-server.
import { assert, assertEquals, assertStrictEquals } from "./assert.ts";
import { closeAll, createUser, JWT_SECRET, post, redis, reset, sql, test, userToken } from "./helpers.ts";
import { createQueueJobHandler } from "../../edge_functions/queue-job/handler.ts";
import { queueFromEnv, TcpRedisQueue, UpstashRestQueue } from "../../edge_functions/_shared/queue.ts";

const TOKEN = "upstash-test-token";
const seen: { method: string; path: string; auth: string | null; type: string | null; body: unknown }[] = [];

const standIn = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
  const body = await req.json().catch(() => null);
  seen.push({ method: req.method, path: new URL(req.url).pathname, auth: req.headers.get("authorization"),
    type: req.headers.get("content-type"), body });
  if (req.headers.get("authorization") !== `Bearer ${TOKEN}`) return Response.json({ error: "Unauthorized" }, { status: 401 });
  if (req.method !== "POST" || !Array.isArray(body) || !body.every((a) => typeof a === "string")) {
    return Response.json({ error: "ERR bad request shape" }, { status: 400 });
  }
  if (String(body[0]).toUpperCase() !== "LPUSH" || body.length !== 3) return Response.json({ error: "ERR unsupported" }, { status: 400 });
  return Response.json({ result: await redis.lPush(body[1], body[2]) });
});
const REST_URL = `http://127.0.0.1:${standIn.addr.port}`;

test("queue-job through Upstash REST: one well-formed LPUSH, payload on the real list", async () => {
  await reset();
  seen.length = 0;
  const handler = createQueueJobHandler({ sql, queue: new UpstashRestQueue(REST_URL + "/", TOKEN), jwtSecret: JWT_SECRET });
  const token = await userToken(await createUser());
  const res = await handler(post("http://localhost/", { jobType: "video_high", prompt: "rain on glass" }, { Authorization: `Bearer ${token}` }));
  const body = await res.json();
  assertStrictEquals(res.status, 200, JSON.stringify(body));
  assertStrictEquals(seen.length, 1);
  const [call] = seen;
  assertEquals([call.method, call.path, call.auth, call.type], ["POST", "/", `Bearer ${TOKEN}`, "application/json"]);
  const args = call.body as string[];
  assertEquals(args.slice(0, 2), ["LPUSH", "wan_queue"]);
  const onList = await redis.lRange("wan_queue", 0, -1);
  assertEquals(onList, [args[2]]);
  assertStrictEquals(JSON.parse(args[2]).jobId, body.jobId);
});

test("an Upstash error fails the job with the reason", async () => {
  await reset();
  const handler = createQueueJobHandler({ sql, queue: new UpstashRestQueue(REST_URL, "wrong-token"), jwtSecret: JWT_SECRET });
  const token = await userToken(await createUser());
  const res = await handler(post("http://localhost/", { jobType: "image_fast", prompt: "x" }, { Authorization: `Bearer ${token}` }));
  const body = await res.json();
  assertStrictEquals(res.status, 503);
  assert(body.error.includes("Unauthorized"), body.error);
  const [row] = await sql`select status, error_message from public.jobs where id = ${body.jobId}`;
  assertEquals([row.status, row.error_message], ["failed", body.error]);
  assertEquals(await redis.lRange("wan_queue", 0, -1), []);
});

test("queueFromEnv: REDIS_URL wins, else the Upstash pair, else an error", () => {
  const env = (vars: Record<string, string>) => ({ get: (k: string) => vars[k] });
  assert(queueFromEnv(env({ REDIS_URL: "redis://127.0.0.1:1", UPSTASH_REDIS_REST_URL: REST_URL, UPSTASH_REDIS_REST_TOKEN: "t" })) instanceof TcpRedisQueue);
  assert(queueFromEnv(env({ UPSTASH_REDIS_REST_URL: REST_URL, UPSTASH_REDIS_REST_TOKEN: "t" })) instanceof UpstashRestQueue);
  let threw = false;
  try {
    queueFromEnv(env({ UPSTASH_REDIS_REST_URL: REST_URL }));
  } catch {
    threw = true;
  }
  assert(threw);
});

test("(stop the Upstash stand-in)", async () => {
  await standIn.shutdown();
});

closeAll();
