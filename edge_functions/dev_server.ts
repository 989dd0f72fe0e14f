// Both functions on one local port, under Supabase's URL layout ({url}/functions/v1/<name>), so
// a worker with SUPABASE_URL=http://127.0.0.1:<PORT> calls job-callback as in production.
// Used by the tests (tests/supabase/fixtures.py: EdgeServer) and for local development:
//   PORT=54321 SUPABASE_DB_URL=... REDIS_URL=... SUPABASE_JWT_SECRET=... SUPABASE_SERVICE_ROLE_KEY=... \
//   node_modules/.bin/deno run --allow-all --config edge_functions/deno.json edge_functions/dev_server.ts
import { callbackAuthFromEnv } from "./_shared/auth.ts";
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
    jwtSecret: Deno.env.get("SUPABASE_JWT_SECRET") ?? "",
    classifier: classifierFromEnv(Deno.env),
  }),
  "/functions/v1/job-callback": createJobCallbackHandler({ sql, auth: callbackAuthFromEnv(Deno.env) }),
};

const port = Number(Deno.env.get("PORT") || 54321);
Deno.serve({ hostname: "127.0.0.1", port, onListen: () => console.log(`edge functions on http://127.0.0.1:${port}`) }, (req) => {
  const path = new URL(req.url).pathname.replace(/\/+$/, "");
  if (path === "/health") return json({ ok: true });
  const route = routes[path];
  return route ? route(req) : errorResponse(404, `no function at ${path}`);
});
