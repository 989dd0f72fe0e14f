// Shared pieces of the Deno tests. tests/test_edge_functions.py starts a fresh PostgreSQL database
// (all migrations applied) and a redis-server, and passes them in TEST_DB_URL / TEST_REDIS_URL.
import postgres from "postgres";
import { createClient } from "redis";
import { hmacHex } from "../../edge_functions/_shared/auth.ts";

export const DB_URL = mustEnv("TEST_DB_URL");
export const REDIS_URL = mustEnv("TEST_REDIS_URL");
export const JWT_SECRET = "deno-test-jwt-secret-of-some-length-0123456789";
export const SERVICE_KEY = "deno-test-service-role-key";
export const CALLBACK_SECRET = "deno-test-callback-secret";

function mustEnv(key: string): string {
  const value = Deno.env.get(key);
  if (!value) throw new Error(`${key} is not set: run these tests through tests/test_edge_functions.py`);
  return value;
}

export const sql = postgres(DB_URL, { max: 2, onnotice: () => {} });
export const redis = createClient({ url: REDIS_URL });
await redis.connect();

/** A test that shares the module-wide connections (so Deno's resource sanitizer is off). */
export function test(name: string, fn: () => void | Promise<void>) {
  Deno.test({ name, fn, sanitizeOps: false, sanitizeResources: false });
}

/** Call after the last test of a module: closes the shared connections. */
export function closeAll() {
  Deno.test({
    name: "(close connections)",
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      await sql.end({ timeout: 5 });
      await redis.quit();
    },
  });
}

export async function reset(): Promise<void> {
  await sql`truncate public.jobs`;
  await redis.flushAll();
}

export async function createUser(): Promise<string> {
  const id = crypto.randomUUID();
  await sql`insert into auth.users (id, email) values (${id}, ${id + "@example.test"})`;
  return id;
}

function b64url(data: Uint8Array | string): string {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export async function signJwt(claims: Record<string, unknown>, secret = JWT_SECRET): Promise<string> {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const key = await crypto.subtle.importKey("raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", key, new TextEncoder().encode(`${head}.${body}`)));
  return `${head}.${body}.${b64url(sig)}`;
}

export async function userToken(userId: string, overrides: Record<string, unknown> = {}): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return await signJwt({ sub: userId, role: "authenticated", aud: "authenticated", iat: now, exp: now + 3600, ...overrides });
}

export async function signCallback(body: string, timestamp = Math.floor(Date.now() / 1000), secret = CALLBACK_SECRET) {
  return {
    "X-Callback-Timestamp": String(timestamp),
    "X-Callback-Signature": "v1=" + await hmacHex(secret, `${timestamp}.${body}`),
  };
}

export function post(url: string, body: unknown, headers: Record<string, string> = {}): Request {
  return new Request(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}
