// Minimal assertions (JSR is not reachable here, so no @std/assert).
import { deepStrictEqual, ok, strictEqual, throws } from "node:assert/strict";

export function assertStrictEquals<T>(actual: T, expected: T, message?: string): void {
  strictEqual(actual, expected, message);
}

export function assertEquals(actual: unknown, expected: unknown, message?: string): void {
  deepStrictEqual(actual, expected, message);
}

export function assert(condition: unknown, message?: string): asserts condition {
  ok(condition, message);
}

/** `fn` throws an Error whose message contains `fragment`. */
export function assertThrows(fn: () => unknown, fragment: string): void {
  throws(fn, (err: unknown) => err instanceof Error && err.message.includes(fragment));
}
