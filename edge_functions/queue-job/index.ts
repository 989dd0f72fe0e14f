// Supabase entry point; the logic is in handler.ts (tested without Deno.serve).
import { dbFromEnv } from "../_shared/db.ts";
import { classifierFromEnv } from "../_shared/prompt_policy.ts";
import { queueFromEnv } from "../_shared/queue.ts";
import { createQueueJobHandler } from "./handler.ts";

const jwtSecret = Deno.env.get("SUPABASE_JWT_SECRET");
if (!jwtSecret) throw new Error("SUPABASE_JWT_SECRET is not set");

Deno.serve(createQueueJobHandler({
  sql: dbFromEnv(Deno.env),
  queue: queueFromEnv(Deno.env),
  jwtSecret,
  classifier: classifierFromEnv(Deno.env),
}));
