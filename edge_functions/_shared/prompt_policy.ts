// Prompt policy: refuse prompts that sexualise minors. The same rules as workers/safety.py (read
// its docstring for the normalisation); the term lists come from workers/prompt_policy_terms.txt
// through tools/gen_supabase.py. tests/supabase/prompt_policy_cases.json checks both languages.
// Classifier hook: set PROMPT_CLASSIFIER_URL to an endpoint answering POST {"prompt"} with
// {"allowed": bool, "reason": string}, or pass a classifier function. Failures refuse (fail closed).
import { PROMPT_POLICY_TERMS } from "./prompt_policy_terms.ts";

export type PolicyCode = "forbidden" | "minor_sexual";
export type Classifier = (prompt: string) => Promise<string | null>;

export const REASONS: Record<string, string> = {
  forbidden: "Prompt refused: it contains a term that refers to sexual content involving minors.",
  minor_sexual: "Prompt refused: it combines a reference to a minor with sexual content.",
  classifier: "Prompt refused by the content classifier.",
  classifier_error: "Prompt refused: the content classifier could not be reached; try again later.",
};

const LEET: Record<string, string> = { "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s" };
const DIGITS_WORD = /^([0-9]+)([a-z]+)$/;
const AGE = / (?:[1-9]|1[0-7]) (?:yo|y o|yrs? old|years? old) /;

export function normalize(text: string): string {
  let t = text.normalize("NFKC").toLowerCase().normalize("NFKD");
  t = t.replace(/[\p{Mn}\p{Cf}]/gu, "");
  const words = t.replace(/[^\p{L}\p{N}@$]/gu, " ").split(/\s+/).filter(Boolean);
  const out: string[] = [];
  for (const word of words) {
    const split = DIGITS_WORD.exec(word);
    for (let part of split ? [split[1], split[2]] : [word]) {
      if (/\p{L}/u.test(part) && /[0-9@$]/.test(part)) part = part.replace(/[0-9@$]/g, (c) => LEET[c] ?? c);
      part = part.replace(/[@$]/g, "");
      if (part) out.push(part);
    }
  }
  return " " + out.join(" ") + " ";
}

const hasAny = (text: string, terms: readonly string[]) => terms.some((term) => text.includes(` ${term} `));

/** The term-list verdict, without a classifier. */
export function classifyPrompt(text: string): PolicyCode | null {
  const norm = normalize(text ?? "");
  if (hasAny(norm, PROMPT_POLICY_TERMS.forbidden)) return "forbidden";
  const minor = hasAny(norm, PROMPT_POLICY_TERMS.minor) || AGE.test(norm);
  return minor && hasAny(norm, PROMPT_POLICY_TERMS.sexual) ? "minor_sexual" : null;
}

export function urlClassifier(url: string, timeoutMs = 5000): Classifier {
  return async (prompt) => {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    if (!response.ok) throw new Error(`classifier answered ${response.status}`);
    const verdict = await response.json();
    return verdict?.allowed === true ? null : String(verdict?.reason || REASONS.classifier);
  };
}

export function classifierFromEnv(env: { get(key: string): string | undefined }): Classifier | null {
  const url = env.get("PROMPT_CLASSIFIER_URL");
  return url ? urlClassifier(url, Number(env.get("PROMPT_CLASSIFIER_TIMEOUT") || 5) * 1000) : null;
}

/** null when the prompt may run, else the reason to show the user. */
export async function checkPrompt(text: string, classifier: Classifier | null = null): Promise<string | null> {
  const code = classifyPrompt(text);
  if (code) return REASONS[code];
  if (!classifier) return null;
  try {
    return await classifier(text ?? "");
  } catch {
    return REASONS.classifier_error;
  }
}
