// The database client: npm:postgres on a connection string. Supabase gives every function
// SUPABASE_DB_URL; tests point it at their own PostgreSQL. The connection is the service's, so
// RLS does not apply: the handlers check ownership themselves.
import postgres from "postgres";

export type Sql = ReturnType<typeof postgres>;

export function connect(url: string): Sql {
  // prepare: false keeps it usable through Supabase's transaction-mode pooler.
  return postgres(url, { max: 4, idle_timeout: 20, connect_timeout: 10, prepare: false, onnotice: () => {} });
}

export function dbFromEnv(env: { get(key: string): string | undefined }): Sql {
  const url = env.get("SUPABASE_DB_URL") || env.get("DATABASE_URL");
  if (!url) throw new Error("set SUPABASE_DB_URL");
  return connect(url);
}

export interface JobRow {
  id: string;
  user_id: string;
  job_type: string;
  status: "queued" | "processing" | "completed" | "failed";
  error_message: string | null;
  attempts: number;
  max_attempts: number;
  metadata: Record<string, unknown>;
  worker_type: string | null;
  queue: string | null;
  file_path: string | null;
  image_urls: string[] | null;
  created_at: Date;
  started_at: Date | null;
  completed_at: Date | null;
  last_progress_at: Date | null;
  [column: string]: unknown;
}

export interface NewJob {
  userId: string;
  jobType: string;
  maxAttempts: number;
  metadata: Record<string, unknown>;
  imageId: string | null;
  videoId: string | null;
  projectId: string | null;
  format: string;
  quality: string;
}

export async function insertJob(sql: Sql, job: NewJob): Promise<JobRow> {
  const [row] = await sql<JobRow[]>`
    insert into public.jobs (user_id, job_type, status, max_attempts, metadata, image_id, video_id, project_id,
                             format, quality)
    values (${job.userId}, ${job.jobType}, 'queued', ${job.maxAttempts}, ${sql.json(job.metadata as never)},
            ${job.imageId}, ${job.videoId}, ${job.projectId}, ${job.format}, ${job.quality})
    returning *`;
  return row;
}

/** The queue push failed: the job must not stay queued forever. */
export async function markFailed(sql: Sql, jobId: string, reason: string): Promise<void> {
  await sql`
    update public.jobs set status = 'failed', error_message = ${reason}, completed_at = now()
     where id = ${jobId} and status in ('queued', 'processing')`;
}

export interface QueueFigures {
  queuePosition: number | null;
  estimatedTime: number | null;
  workerType: string | null;
  queue: string | null;
}

export async function queueFigures(sql: Sql, jobId: string): Promise<QueueFigures> {
  const [row] = await sql`select public.job_status(${jobId}) as s`;
  const s = (row?.s ?? {}) as Record<string, unknown>;
  return {
    queuePosition: (s.queuePosition as number | null) ?? null,
    estimatedTime: s.estimatedTime == null ? null : Number(s.estimatedTime),
    workerType: (s.workerType as string | null) ?? null,
    queue: (s.queue as string | null) ?? null,
  };
}

export async function getJob(sql: Sql, jobId: string): Promise<JobRow | null> {
  const [row] = await sql<JobRow[]>`select * from public.jobs where id = ${jobId}`;
  return row ?? null;
}

export interface CallbackUpdate {
  jobId: string;
  status: "processing" | "completed" | "failed";
  filePath: string | null;
  imageUrls: string[] | null;
  errorMessage: string | null;
  attempt: number | null;
  /** Merged into jobs.metadata: the bucket the outputs are in, and why a job ran as its fallback. */
  metadata: Record<string, unknown> | null;
}

/**
 * Apply a worker's report in one guarded UPDATE: only queued/processing jobs change, so a finished
 * job never moves back and a repeated callback changes nothing. Null: the guard refused.
 */
export async function applyCallback(sql: Sql, u: CallbackUpdate): Promise<JobRow | null> {
  const [row] = await sql<JobRow[]>`
    update public.jobs set
      status = ${u.status},
      started_at = case when ${u.status} = 'processing' then coalesce(started_at, now()) else started_at end,
      completed_at = case when ${u.status} in ('completed', 'failed') then now() else completed_at end,
      last_progress_at = now(),
      attempts = greatest(attempts + case when status = 'queued' then 1 else 0 end, coalesce(${u.attempt}::int, 0)),
      file_path = coalesce(${u.filePath}::text, file_path),
      image_urls = coalesce(${u.imageUrls}::text[], image_urls),
      error_message = case when ${u.status} = 'failed' then ${u.errorMessage}::text else error_message end,
      metadata = metadata || coalesce((${u.metadata ? JSON.stringify(u.metadata) : null}::text)::jsonb, '{}'::jsonb)
    where id = ${u.jobId} and status in ('queued', 'processing')
    returning *`;
  return row ?? null;
}
