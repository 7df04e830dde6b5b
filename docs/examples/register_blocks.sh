prefect block register -m prefect_raydog
