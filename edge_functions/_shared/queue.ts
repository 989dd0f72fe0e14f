// The queue client: one small interface, two implementations.
// - UpstashRestQueue: Upstash's REST API (production; no TCP from the edge runtime needed).
// - TcpRedisQueue: plain Redis over TCP via npm:redis (local development and the tests).
// queueFromEnv picks REDIS_URL when set, else UPSTASH_REDIS_REST_URL + UPSTASH_REDIS_REST_TOKEN.
import { createClient } from "redis";

export interface QueueClient {
  /** LPUSH one item; resolves to the list's new length. Workers take from the right (FIFO). */
  lpush(key: string, value: string): Promise<number>;
  close(): Promise<void>;
}

export class QueueError extends Error {}

const TIMEOUT_MS = 5000;

export class UpstashRestQueue implements QueueClient {
  constructor(
    private readonly url: string,
    private readonly token: string,
    private readonly fetchFn: typeof fetch = fetch,
  ) {}

  /** One command as a JSON array: POST {url} ["LPUSH", key, value] (binary-safe, no URL encoding). */
  async command(args: string[]): Promise<unknown> {
    let response: Response;
    try {
      response = await this.fetchFn(this.url.replace(/\/+$/, ""), {
        method: "POST",
        headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
        body: JSON.stringify(args),
        signal: AbortSignal.timeout(TIMEOUT_MS),
      });
    } catch (err) {
      throw new QueueError(`Upstash unreachable: ${(err as Error).message}`);
    }
    const text = await response.text();
    let parsed: { result?: unknown; error?: string };
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new QueueError(`Upstash answered ${response.status} without JSON`);
    }
    if (!response.ok || parsed.error !== undefined) {
      throw new QueueError(`Upstash ${args[0]} failed (${response.status}): ${parsed.error ?? text.slice(0, 200)}`);
    }
    return parsed.result;
  }

  async lpush(key: string, value: string): Promise<number> {
    const result = await this.command(["LPUSH", key, value]);
    if (typeof result !== "number") throw new QueueError(`Upstash LPUSH returned ${JSON.stringify(result)}`);
    return result;
  }

  async close(): Promise<void> {}
}

export class TcpRedisQueue implements QueueClient {
  private client: ReturnType<typeof createClient> | null = null;

  constructor(private readonly url: string) {}

  private async connected() {
    if (this.client?.isReady) return this.client;
    await this.close();
    // No offline queue and no endless reconnects: a dead Redis must fail the request quickly.
    const client = createClient({
      url: this.url,
      disableOfflineQueue: true,
      socket: { connectTimeout: TIMEOUT_MS, reconnectStrategy: false },
    });
    client.on("error", () => {}); // surfaced through the rejected command instead
    await withTimeout(client.connect(), "Redis connect");
    this.client = client;
    return client;
  }

  async lpush(key: string, value: string): Promise<number> {
    try {
      const client = await this.connected();
      return await withTimeout(client.lPush(key, value), "Redis LPUSH");
    } catch (err) {
      await this.close();
      throw err instanceof QueueError ? err : new QueueError(`Redis LPUSH failed: ${(err as Error).message}`);
    }
  }

  async close(): Promise<void> {
    const client = this.client;
    this.client = null;
    if (client) {
      try {
        await client.disconnect();
      } catch {
        // already closed
      }
    }
  }
}

async function withTimeout<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new QueueError(`${what} timed out after ${TIMEOUT_MS} ms`)), TIMEOUT_MS);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export function queueFromEnv(env: { get(key: string): string | undefined }): QueueClient {
  const redisUrl = env.get("REDIS_URL");
  if (redisUrl) return new TcpRedisQueue(redisUrl);
  const restUrl = env.get("UPSTASH_REDIS_REST_URL");
  const token = env.get("UPSTASH_REDIS_REST_TOKEN");
  if (restUrl && token) return new UpstashRestQueue(restUrl, token);
  throw new Error("set REDIS_URL, or UPSTASH_REDIS_REST_URL and UPSTASH_REDIS_REST_TOKEN");
}
