// Authentication for both functions, with WebCrypto only (no JWT library to pin or audit):
// - users: the Supabase access token: HS256 with the legacy JWT secret, or ES256/RS256 with the
//   project's signing keys (SUPABASE_JWKS);
// - workers: HMAC-SHA256 signature over "<timestamp>.<raw body>" with CALLBACK_SECRET, or the
//   service key as a bearer token (the live workers' form) unless CALLBACK_REQUIRE_SIGNATURE=true.
// Every secret comparison is constant-time.

const encoder = new TextEncoder();
export const SIGNATURE_MAX_AGE_S = 300;

async function hmacKey(secret: string): Promise<CryptoKey> {
  return await crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
    "verify",
  ]);
}

export async function hmacHex(secret: string, message: string): Promise<string> {
  const sig = new Uint8Array(await crypto.subtle.sign("HMAC", await hmacKey(secret), encoder.encode(message)));
  return Array.from(sig, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Constant-time string equality: both sides are hashed first, so lengths do not leak either. */
export async function safeEqual(a: string, b: string): Promise<boolean> {
  const [ha, hb] = await Promise.all([
    crypto.subtle.digest("SHA-256", encoder.encode(a)),
    crypto.subtle.digest("SHA-256", encoder.encode(b)),
  ]);
  const x = new Uint8Array(ha), y = new Uint8Array(hb);
  let diff = 0;
  for (let i = 0; i < x.length; i++) diff |= x[i] ^ y[i];
  return diff === 0;
}

function b64urlDecode(part: string): Uint8Array<ArrayBuffer> {
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((part.length + 3) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

export function bearer(req: Request): string | null {
  const header = req.headers.get("authorization") ?? "";
  const match = /^Bearer\s+(\S+)$/i.exec(header.trim());
  return match ? match[1] : null;
}

export interface UserClaims {
  sub: string;
  role: string;
  exp: number;
  [key: string]: unknown;
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const ASYMMETRIC: Record<string, { import: RsaHashedImportParams | EcKeyImportParams; verify: AlgorithmIdentifier | EcdsaParams }> = {
  ES256: { import: { name: "ECDSA", namedCurve: "P-256" }, verify: { name: "ECDSA", hash: "SHA-256" } },
  RS256: { import: { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" }, verify: { name: "RSASSA-PKCS1-v1_5" } },
};

async function signatureValid(alg: string, kid: unknown, parts: string[], secret: string | null, jwks: JsonWebKey[]) {
  const data = encoder.encode(`${parts[0]}.${parts[1]}`);
  const sig = b64urlDecode(parts[2]);
  if (alg === "HS256") return secret ? await crypto.subtle.verify("HMAC", await hmacKey(secret), sig, data) : false;
  const params = ASYMMETRIC[alg];
  // Projects on asymmetric signing keys publish them as SUPABASE_JWKS; pick the token's kid.
  const jwk = jwks.find((k) => (k as { kid?: string }).kid === kid && (!k.alg || k.alg === alg));
  if (!params || !jwk) return false;
  const key = await crypto.subtle.importKey("jwk", jwk, params.import, false, ["verify"]);
  return await crypto.subtle.verify(params.verify, key, sig, data);
}

/** The signed-in user's claims, or a reason why the token is not acceptable. */
export async function verifyUserJwt(
  token: string | null,
  secret: string | null,
  now = Date.now() / 1000,
  jwks: JsonWebKey[] = [],
): Promise<{ claims: UserClaims } | { error: string }> {
  if (!token) return { error: "missing bearer token" };
  const parts = token.split(".");
  if (parts.length !== 3) return { error: "malformed token" };
  let header: { alg?: string; kid?: string }, claims: UserClaims;
  try {
    header = JSON.parse(new TextDecoder().decode(b64urlDecode(parts[0])));
    claims = JSON.parse(new TextDecoder().decode(b64urlDecode(parts[1])));
  } catch {
    return { error: "malformed token" };
  }
  const alg = header.alg ?? "";
  if (alg !== "HS256" && !Object.hasOwn(ASYMMETRIC, alg)) return { error: "unsupported token algorithm" };
  let valid = false;
  try {
    valid = await signatureValid(alg, header.kid, parts, secret, jwks);
  } catch {
    valid = false;
  }
  if (!valid) return { error: "invalid token signature" };
  if (typeof claims.exp !== "number" || claims.exp < now) return { error: "token expired" };
  if (claims.role !== "authenticated") return { error: "not a signed-in user" };
  if (typeof claims.sub !== "string" || !UUID.test(claims.sub)) return { error: "token has no user id" };
  return { claims };
}

/**
 * How queue-job checks user tokens: the legacy JWT secret (HS256) and/or the project's public
 * signing keys. Supabase gives functions SUPABASE_JWKS; it does not give the JWT secret, and
 * `supabase secrets set` refuses SUPABASE_* names, so a legacy project deploys it as JWT_SECRET.
 */
export function userKeysFromEnv(env: { get(key: string): string | undefined }): { jwtSecret: string | null; jwks: JsonWebKey[] } {
  const jwtSecret = env.get("JWT_SECRET") || env.get("SUPABASE_JWT_SECRET") || null;
  const raw = env.get("SUPABASE_JWKS");
  const parsed = raw ? JSON.parse(raw) : [];
  const jwks: JsonWebKey[] = Array.isArray(parsed) ? parsed : (parsed.keys ?? []);
  if (!jwtSecret && jwks.length === 0) throw new Error("set JWT_SECRET or SUPABASE_JWKS for queue-job");
  return { jwtSecret, jwks };
}

export interface CallbackAuthConfig {
  serviceKey: string | null;
  callbackSecret: string | null;
  requireSignature: boolean;
}

export function callbackAuthFromEnv(env: { get(key: string): string | undefined }): CallbackAuthConfig {
  const config = {
    serviceKey: env.get("SUPABASE_SERVICE_ROLE_KEY") || env.get("SUPABASE_SERVICE_KEY") || null,
    callbackSecret: env.get("CALLBACK_SECRET") || null,
    requireSignature: (env.get("CALLBACK_REQUIRE_SIGNATURE") ?? "").toLowerCase() === "true",
  };
  // Signatures required but no secret to check them: every callback would be refused for good.
  if (config.requireSignature && !config.callbackSecret) throw new Error("CALLBACK_REQUIRE_SIGNATURE=true needs CALLBACK_SECRET");
  return config;
}

/** null when the caller is a worker; else the reason (answered with 401). */
export async function verifyCallback(
  req: Request,
  rawBody: string,
  config: CallbackAuthConfig,
  now = Date.now() / 1000,
): Promise<string | null> {
  const signature = req.headers.get("x-callback-signature");
  const timestamp = req.headers.get("x-callback-timestamp");
  if (signature !== null && config.callbackSecret) {
    // A signature that is present must be valid, even when the bearer would pass.
    if (!timestamp || !/^\d{1,12}$/.test(timestamp)) return "missing or malformed X-Callback-Timestamp";
    if (Math.abs(now - Number(timestamp)) > SIGNATURE_MAX_AGE_S) return "callback signature expired";
    const expected = "v1=" + await hmacHex(config.callbackSecret, `${timestamp}.${rawBody}`);
    return await safeEqual(signature.trim().toLowerCase(), expected) ? null : "invalid callback signature";
  }
  if (config.requireSignature) return "callback signature required";
  const token = bearer(req);
  if (!token || !config.serviceKey) return "missing credentials";
  return await safeEqual(token, config.serviceKey) ? null : "invalid credentials";
}
