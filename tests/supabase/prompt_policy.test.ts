// The shared prompt-policy vectors, checked against the TypeScript implementation
// (tests/test_safety.py checks the same file against workers/safety.py).
import { assertStrictEquals } from "./assert.ts";
import { checkPrompt, classifyPrompt, normalize, REASONS } from "../../edge_functions/_shared/prompt_policy.ts";

const vectors = JSON.parse(await Deno.readTextFile(new URL("./prompt_policy_cases.json", import.meta.url)));

Deno.test("shared prompt-policy vectors", async () => {
  for (const c of vectors.cases) {
    assertStrictEquals(classifyPrompt(c.prompt), c.expect, `classify ${JSON.stringify(c.prompt)}`);
    assertStrictEquals(await checkPrompt(c.prompt), c.expect === null ? null : REASONS[c.expect], c.prompt);
  }
});

Deno.test("normalisation matches the Python rules", () => {
  assertStrictEquals(normalize("Ｈｅｌｌｏ,  W0rld!"), " hello world ");
  assertStrictEquals(normalize("12yo"), " 12 yo ");
  assertStrictEquals(normalize("a\u200db"), " ab ");
  assertStrictEquals(normalize("Crème brûlée"), " creme brulee ");
  assertStrictEquals(normalize("100 cats"), " 100 cats ");
});

Deno.test("classifier hook: used after the lists, fails closed", async () => {
  const seen: string[] = [];
  const dragons = (p: string) => {
    seen.push(p);
    return Promise.resolve(p.includes("dragon") ? "no dragons" : null);
  };
  assertStrictEquals(await checkPrompt("a red dragon", dragons), "no dragons");
  assertStrictEquals(await checkPrompt("a red fox", dragons), null);
  assertStrictEquals(await checkPrompt("nude child", dragons), REASONS.minor_sexual);
  assertStrictEquals(seen.join(","), "a red dragon,a red fox");
  const broken = () => Promise.reject(new Error("down"));
  assertStrictEquals(await checkPrompt("a red fox", broken), REASONS.classifier_error);
});
