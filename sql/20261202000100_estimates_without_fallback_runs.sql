-- Guarantees: job_type_estimate_seconds(type) measures a job type by its own runs only. A job that
-- ran as its fallback (jobs.metadata has `fallback`, set by job-callback: an sdxl job rendered by
-- the Wan worker) took the fallback's time; counting it would inflate the sdxl estimate while the
-- image worker is down, and keep it inflated for a week. Same contract as
-- 20261122000300_queue_functions.sql otherwise: the median of the last 50 completed runs in 7 days
-- when there are at least 3, else the type's expected_seconds. Idempotent (create or replace).

create or replace function public.job_type_estimate_seconds(p_job_type text) returns double precision
language sql stable security definer set search_path = public, pg_temp as $$
  with recent as (
    select extract(epoch from (completed_at - started_at))::double precision as secs
      from public.jobs
     where job_type = p_job_type and status = 'completed'
       and started_at is not null and completed_at > started_at
       and completed_at > now() - interval '7 days'
       and not coalesce(metadata ? 'fallback', false)
     order by completed_at desc
     limit 50
  )
  select case
           when (select count(*) from recent) >= 3
             then (select percentile_cont(0.5) within group (order by secs) from recent)
           else (select expected_seconds from public.job_type_catalog where job_type = p_job_type)
         end
$$;
