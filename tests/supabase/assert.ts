// Minimal assertions (JSR is not reachable here, so no @std/assert).
import { deepStrictEqual, ok, strictEqual } from "node:assert/strict";

export function assertStrictEquals<T>(actual: T, expected: T, message?: string): void {
  strictEqual(actual, expected, message);
}

export function assertEquals(actual: unknown, expected: unknown, message?: string): void {
  deepStrictEqual(actual, expected, message);
}

export function assert(condition: unknown, message?: string): asserts condition {
  ok(condition, message);
}
