// queue-job for the Qwen-Image / Z-Image job types: edit pictures, inpaint masks and LoRAs reach the payload.
import { assert, assertEquals, assertStrictEquals } from "./assert.ts";
import { closeAll, createUser, JWT_SECRET, post, redis, REDIS_URL, reset, sql, test, userToken } from "./helpers.ts";
import { createQueueJobHandler } from "../../edge_functions/queue-job/handler.ts";
import { LIMITS } from "../../edge_functions/_shared/job_types.ts";
import { TcpRedisQueue } from "../../edge_functions/_shared/queue.ts";

const queue = new TcpRedisQueue(REDIS_URL);
const handler = createQueueJobHandler({ sql, queue, jwtSecret: JWT_SECRET });
const PNG_1PX = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

async function call(body: unknown, token: string) {
  const response = await handler(post("http://localhost/functions/v1/queue-job", body, { Authorization: `Bearer ${token}` }));
  return { status: response.status, body: await response.json() };
}

test("edit, inpaint and LoRA inputs go into the sdxl_queue payload; bad ones are refused", async () => {
  await reset();
  const token = await userToken(await createUser());
  const loras = [{ name: "character-anna", weight: 0.8 }];
  for (const body of [
    { jobType: "qwen_image_edit_2511", prompt: "make it night", initImage: PNG_1PX },
    { jobType: "qwen_image_inpaint_2511", prompt: "a red door", initImage: PNG_1PX, maskImage: PNG_1PX },
    { jobType: "z_image_turbo", prompt: "a portrait", loras },
  ]) {
    const res = await call(body, token);
    assertStrictEquals(res.status, 200, JSON.stringify(res.body));
  }
  const [zimage, inpaint, edit] = (await redis.lRange("sdxl_queue", 0, -1)).map((x: string) => JSON.parse(x));
  assertEquals([edit.jobType, edit.referenceImages, edit.isSDXL], ["qwen_image_edit_2511", [PNG_1PX], true]);   // sdxl_queue's worker
  assertStrictEquals(edit.initImage, undefined);   // the picture is queued once, as referenceImages
  assertEquals([inpaint.initImage, inpaint.maskImage, inpaint.numImages], [PNG_1PX, PNG_1PX, 1]);
  assertEquals([zimage.loras, zimage.bucket], [loras, "z_image_turbo"]);
  for (const [body, error] of [
    [{ jobType: "qwen_image_inpaint_2511", prompt: "x", initImage: PNG_1PX }, "needs maskImage"],
    [{ jobType: "qwen_image_inpaint_2511", prompt: "x", initImage: PNG_1PX, maskImage: "ftp://x" }, "maskImage must be an http(s) URL"],
    [{ jobType: "qwen_image_edit_2511", prompt: "x" }, "needs 1 to 3 referenceImages"],
    [{ jobType: "z_image_turbo", prompt: "x", loras: Array(LIMITS.maxLorasPerJob + 1).fill(loras[0]) }, "loras must be a list"],
  ] as [unknown, string][]) {
    const res = await call(body, token);
    assertStrictEquals(res.status, 400, JSON.stringify(body).slice(0, 80));
    assert(String(res.body.error).includes(error), `${JSON.stringify(body).slice(0, 80)}: ${res.body.error}`);
  }
  await queue.close();
});

closeAll();
