# One image for the supervisor/API and for the Ray head and workers: the shard actors run on the
# Ray nodes, so those need mabrec's code as well.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
WORKDIR /opt/mabrec
COPY pyproject.toml README.md LICENSE ./
COPY system system
COPY actors actors
COPY api api
COPY bench bench
COPY sim sim
COPY sql sql
COPY data data
COPY cli.py supervisor.py ./
RUN pip install --no-cache-dir -e .
CMD ["mabrec", "up"]
