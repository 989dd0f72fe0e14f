// Supabase entry point; the logic is in handler.ts (tested without Deno.serve).
import { userKeysFromEnv } from "../_shared/auth.ts";
import { dbFromEnv } from "../_shared/db.ts";
import { classifierFromEnv } from "../_shared/prompt_policy.ts";
import { queueFromEnv } from "../_shared/queue.ts";
import { createQueueJobHandler } from "./handler.ts";

Deno.serve(createQueueJobHandler({
  sql: dbFromEnv(Deno.env),
  queue: queueFromEnv(Deno.env),
  ...userKeysFromEnv(Deno.env),
  classifier: classifierFromEnv(Deno.env),
}));
