# Deploy flows/deployment.py to a process work pool; run from the repository root.
python flows/deployment.py save-blocks   # saves raydog-demo-credentials and raydog-demo-cluster
prefect work-pool create raydog-pool --type process --overwrite
prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml
