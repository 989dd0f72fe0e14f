"""RYLA's synchronous HTTP endpoints (CONTRACT.md, second part) in front of the daemon's queues.

A request becomes a normal job (workers/submit.py, the CLI's path), the image or video worker runs
it, and the gateway answers with the stored output converted to what RYLA expects. It never runs a
model. The endpoint → job type mapping is job_types.yaml's `ryla` section.
"""
