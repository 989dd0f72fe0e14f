-- Guarantees: the UI's queue figures are computed inside Postgres from the jobs table.
--   job_type_estimate_seconds(type)  median run time (started_at → completed_at) of the last 50
--                                    completed jobs of that type in 7 days when there are at least
--                                    3, else the type's expected_seconds from job_types.yaml
--   job_queue_position(job)          1 = next to run: 1 + queued jobs of the same queue created
--                                    before it (workers serve each queue oldest first); 0 while
--                                    processing; null when finished or not the caller's job
--   job_estimated_seconds(job)       seconds until the job should be done, assuming one worker
--                                    per queue: the remaining time of the queue's processing jobs,
--                                    the estimates of the queued jobs ahead, and its own
--   job_status(job)                  the seed §3.4 JobStatus object (jsonb) for one job
--   my_active_jobs()                 the caller's queued/processing jobs with those figures
-- A user only gets figures for their own jobs; the service role and direct connections get all.
-- Idempotent (create or replace).

create or replace function public.job_caller_may_see(p_owner uuid) returns boolean
language sql stable set search_path = public, pg_temp as $$
  -- The role GUC is what PostgREST sets (anon/authenticated/service_role); 'none' for a direct login.
  select coalesce(p_owner = auth.uid(), false)
      or coalesce(nullif(current_setting('role', true), ''), 'none') not in ('anon', 'authenticated')
$$;

create or replace function public.job_type_estimate_seconds(p_job_type text) returns double precision
language sql stable security definer set search_path = public, pg_temp as $$
  with recent as (
    select extract(epoch from (completed_at - started_at))::double precision as secs
      from public.jobs
     where job_type = p_job_type and status = 'completed'
       and started_at is not null and completed_at > started_at
       and completed_at > now() - interval '7 days'
     order by completed_at desc
     limit 50
  )
  select case
           when (select count(*) from recent) >= 3
             then (select percentile_cont(0.5) within group (order by secs) from recent)
           else (select expected_seconds from public.job_type_catalog where job_type = p_job_type)
         end
$$;

create or replace function public.job_queue_position(p_job_id uuid) returns integer
language plpgsql stable security definer set search_path = public, pg_temp as $$
declare
  j public.jobs%rowtype;
begin
  select * into j from public.jobs where id = p_job_id;
  if not found or not public.job_caller_may_see(j.user_id) then
    return null;
  end if;
  if j.status = 'processing' then
    return 0;
  elsif j.status <> 'queued' then
    return null;
  end if;
  return 1 + (select count(*)
                from public.jobs o
               where o.status = 'queued' and o.queue is not distinct from j.queue
                 and (o.created_at, o.id) < (j.created_at, j.id));
end $$;

create or replace function public.job_estimated_seconds(p_job_id uuid) returns double precision
language plpgsql stable security definer set search_path = public, pg_temp as $$
declare
  j public.jobs%rowtype;
  own double precision;
  ahead double precision;
begin
  select * into j from public.jobs where id = p_job_id;
  if not found or not public.job_caller_may_see(j.user_id) then
    return null;
  end if;
  if j.status in ('completed', 'failed') then
    return 0;
  end if;
  own := coalesce(public.job_type_estimate_seconds(j.job_type), 0);
  if j.status = 'processing' then
    return greatest(own - coalesce(extract(epoch from now() - j.started_at), 0), 0);
  end if;
  with est as (
    select c.job_type, public.job_type_estimate_seconds(c.job_type) as secs from public.job_type_catalog c
  )
  select coalesce(sum(case
           when o.status = 'processing'
             then greatest(coalesce(e.secs, 0) - coalesce(extract(epoch from now() - o.started_at), 0), 0)
           else coalesce(e.secs, 0)
         end), 0)
    into ahead
    from public.jobs o
    left join est e on e.job_type = o.job_type
   where o.queue is not distinct from j.queue
     and (o.status = 'processing'
          or (o.status = 'queued' and (o.created_at, o.id) < (j.created_at, j.id)));
  return ahead + own;
end $$;

create or replace function public.job_status(p_job_id uuid) returns jsonb
language plpgsql stable security definer set search_path = public, pg_temp as $$
declare
  j public.jobs%rowtype;
begin
  select * into j from public.jobs where id = p_job_id;
  if not found or not public.job_caller_may_see(j.user_id) then
    return null;
  end if;
  return jsonb_build_object(
    'jobId', j.id, 'jobType', j.job_type, 'status', j.status, 'workerType', j.worker_type,
    'queue', j.queue, 'queuePosition', public.job_queue_position(j.id),
    'estimatedTime', round(public.job_estimated_seconds(j.id)::numeric, 1),
    'errorMessage', j.error_message, 'filePath', j.file_path, 'imageUrls', to_jsonb(j.image_urls),
    'createdAt', j.created_at, 'startedAt', j.started_at, 'completedAt', j.completed_at);
end $$;

create or replace function public.my_active_jobs()
returns table (job_id uuid, job_type text, queue text, status text, worker_type text,
               queue_position integer, estimated_seconds double precision)
language sql stable set search_path = public, pg_temp as $$
  -- Security invoker: RLS on jobs limits the rows to the caller's own.
  select j.id, j.job_type, j.queue, j.status, j.worker_type,
         public.job_queue_position(j.id), public.job_estimated_seconds(j.id)
    from public.jobs j
   where j.user_id = auth.uid() and j.status in ('queued', 'processing')
   order by j.queue, j.created_at, j.id
$$;

revoke execute on function public.job_caller_may_see(uuid), public.job_type_estimate_seconds(text),
  public.job_queue_position(uuid), public.job_estimated_seconds(uuid), public.job_status(uuid),
  public.my_active_jobs() from public;
grant execute on function public.job_caller_may_see(uuid), public.job_type_estimate_seconds(text),
  public.job_queue_position(uuid), public.job_estimated_seconds(uuid), public.job_status(uuid),
  public.my_active_jobs() to authenticated, service_role;
grant execute on function public.job_type_estimate_seconds(text) to anon;
