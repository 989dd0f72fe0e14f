// Both functions on one local port, under Supabase's URL layout ({url}/functions/v1/<name>), so
// a worker with SUPABASE_URL=http://127.0.0.1:<PORT> calls job-callback as in production.
// Used by the tests (tests/supabase/fixtures.py: EdgeServer) and for local development:
//   PORT=54321 SUPABASE_DB_URL=... REDIS_URL=... JWT_SECRET=... SUPABASE_SERVICE_ROLE_KEY=... \
//   node_modules/.bin/deno run --allow-all --config edge_functions/deno.json edge_functions/dev_server.ts
import { callbackAuthFromEnv, userKeysFromEnv } from "./_shared/auth.ts";
import { errorResponse, json } from "./_shared/cors.ts";
import { dbFromEnv } from "./_shared/db.ts";
import { classifierFromEnv } from "./_shared/prompt_policy.ts";
import { queueFromEnv } from "./_shared/queue.ts";
import { createJobCallbackHandler } from "./job-callback/handler.ts";
import { createQueueJobHandler } from "./queue-job/handler.ts";

const sql = dbFromEnv(Deno.env);
const routes: Record<string, (req: Request) => Promise<Response>> = {
  "/functions/v1/queue-job": createQueueJobHandler({
    sql,
    queue: queueFromEnv(Deno.env),
    ...userKeysFromEnv(Deno.env),
    classifier: classifierFromEnv(Deno.env),
  }),
  "/functions/v1/job-callback": createJobCallbackHandler({ sql, auth: callbackAuthFromEnv(Deno.env) }),
};

// Optional: forward /storage/v1/* to a storage stand-in, so a worker needs one SUPABASE_URL only.
const storageUrl = Deno.env.get("DEV_STORAGE_URL")?.replace(/\/+$/, "");

async function forwardStorage(req: Request): Promise<Response> {
  const url = new URL(req.url);
  const body = req.method === "GET" || req.method === "HEAD" ? undefined : await req.arrayBuffer();
  const response = await fetch(`${storageUrl}${url.pathname}${url.search}`, { method: req.method, headers: req.headers, body });
  return new Response(await response.arrayBuffer(), { status: response.status, headers: response.headers });
}

const port = Number(Deno.env.get("PORT") || 54321);
Deno.serve({ hostname: "127.0.0.1", port, onListen: () => console.log(`edge functions on http://127.0.0.1:${port}`) }, (req) => {
  const path = new URL(req.url).pathname.replace(/\/+$/, "");
  if (path === "/health") return json({ ok: true });
  if (storageUrl && path.startsWith("/storage/v1/")) return forwardStorage(req);
  const route = routes[path];
  return route ? route(req) : errorResponse(404, `no function at ${path}`);
});
