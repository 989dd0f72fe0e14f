// Supabase entry point; the logic is in handler.ts (tested without Deno.serve).
import { callbackAuthFromEnv } from "../_shared/auth.ts";
import { dbFromEnv } from "../_shared/db.ts";
import { createJobCallbackHandler } from "./handler.ts";

Deno.serve(createJobCallbackHandler({ sql: dbFromEnv(Deno.env), auth: callbackAuthFromEnv(Deno.env) }));
