-- Guarantees: in the job buckets (public.job_type_buckets, filled from job_types.yaml), a signed-in
-- user can read (and so sign URLs for) only objects under their own "{userId}/" folder; users
-- cannot upload, change or delete there (workers upload with the service key, which bypasses RLS).
-- The buckets themselves are created private by the generated job_types migration.
-- Idempotent: each policy is dropped and created again.

drop policy if exists "job outputs: owner reads" on storage.objects;
create policy "job outputs: owner reads" on storage.objects
  for select to authenticated
  using (
    bucket_id in (select b.bucket from public.job_type_buckets b)
    and (storage.foldername(name))[1] = auth.uid()::text
  );
