-- Guarantees: public.jobs exists with the live table's columns plus worker_type, queue, output
-- paths and last_progress_at (added to an existing live table without touching its rows); status is
-- one of queued/processing/completed/failed and never leaves completed/failed; RLS lets a user
-- read only their own jobs and lets no user insert, update or delete (the edge functions do that
-- as service_role or over SUPABASE_DB_URL); the job-type catalog tables exist (rows: next migration).
-- Idempotent: every statement can run again.

create table if not exists public.job_type_catalog (
  job_type text primary key,
  queue text not null,
  worker_type text not null,
  content text not null check (content in ('image', 'video')),
  expected_seconds double precision not null check (expected_seconds > 0),
  max_attempts integer not null,
  phase integer not null
);

create table if not exists public.job_type_buckets (
  job_type text not null references public.job_type_catalog (job_type) on delete cascade,
  bucket text not null,
  is_default boolean not null default false,
  primary key (job_type, bucket)
);

create table if not exists public.jobs (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  job_type text not null,
  status text not null default 'queued',
  error_message text,
  attempts integer not null default 0,
  max_attempts integer not null default 3,
  metadata jsonb not null default '{}'::jsonb,
  image_id uuid,
  video_id uuid,
  project_id uuid,
  format text,
  quality text,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  completed_at timestamptz
);

-- Columns this project adds; "if not exists" so a live table keeps its data.
alter table public.jobs add column if not exists worker_type text default 'WAN';
alter table public.jobs add column if not exists queue text;
alter table public.jobs add column if not exists file_path text;
alter table public.jobs add column if not exists image_urls text[];
alter table public.jobs add column if not exists last_progress_at timestamptz;

alter table public.jobs drop constraint if exists jobs_status_check;
alter table public.jobs add constraint jobs_status_check
  check (status in ('queued', 'processing', 'completed', 'failed'));

create index if not exists jobs_user_created_idx on public.jobs (user_id, created_at desc);
create index if not exists jobs_queued_idx on public.jobs (queue, created_at) where status = 'queued';
create index if not exists jobs_active_idx on public.jobs (queue) where status = 'processing';
create index if not exists jobs_completed_idx on public.jobs (job_type, completed_at desc) where status = 'completed';

-- New rows take worker_type and queue from the catalog, whatever the inserter sent.
create or replace function public.jobs_fill_routing() returns trigger
language plpgsql set search_path = public, pg_temp as $$
declare
  c public.job_type_catalog%rowtype;
begin
  select * into c from public.job_type_catalog where job_type = new.job_type;
  if found then
    new.worker_type := c.worker_type;
    new.queue := c.queue;
  end if;
  return new;
end $$;

drop trigger if exists jobs_fill_routing on public.jobs;
create trigger jobs_fill_routing before insert on public.jobs
  for each row execute function public.jobs_fill_routing();

-- Backstop for the edge function's guarded UPDATE: a finished job never changes status again,
-- and processing never goes back to queued.
create or replace function public.jobs_monotonic_status() returns trigger
language plpgsql set search_path = public, pg_temp as $$
begin
  if old.status in ('completed', 'failed') and new.status is distinct from old.status then
    raise exception 'job % is % and cannot become %', old.id, old.status, new.status
      using errcode = 'check_violation';
  end if;
  if old.status = 'processing' and new.status = 'queued' then
    raise exception 'job % is processing and cannot become queued', old.id
      using errcode = 'check_violation';
  end if;
  return new;
end $$;

drop trigger if exists jobs_monotonic_status on public.jobs;
create trigger jobs_monotonic_status before update of status on public.jobs
  for each row execute function public.jobs_monotonic_status();

-- Row level security: users read their own rows; writes only through the service role.
alter table public.jobs enable row level security;

drop policy if exists "jobs: users read own" on public.jobs;
create policy "jobs: users read own" on public.jobs
  for select to authenticated using (user_id = auth.uid());

revoke insert, update, delete, truncate on public.jobs from anon, authenticated;
revoke all on public.jobs from anon;
grant select on public.jobs to authenticated;
grant all on public.jobs to service_role;

-- The catalog is public information (the UI shows expected times); nobody but the service writes it.
alter table public.job_type_catalog enable row level security;
alter table public.job_type_buckets enable row level security;
drop policy if exists "job_type_catalog: readable" on public.job_type_catalog;
create policy "job_type_catalog: readable" on public.job_type_catalog for select to anon, authenticated using (true);
drop policy if exists "job_type_buckets: readable" on public.job_type_buckets;
create policy "job_type_buckets: readable" on public.job_type_buckets for select to anon, authenticated using (true);
revoke insert, update, delete, truncate on public.job_type_catalog, public.job_type_buckets from anon, authenticated;
grant select on public.job_type_catalog, public.job_type_buckets to anon, authenticated;
grant all on public.job_type_catalog, public.job_type_buckets to service_role;
