#!/bin/sh
# Container entrypoint for the one VisionTune image.
#   api [ARGS...]     run migrations, then serve the API on 0.0.0.0:${PORT:-8000}
#   worker [ARGS...]  Celery worker on the training queue
#   background [ARGS...]  Celery worker on the ingest and exports queues, at a lower CPU priority
#   anything else     run as given (e.g. `visiontune migrate`, `sh`)
# Each branch execs, so the server is PID 1's replacement and receives SIGTERM/SIGINT itself.
set -eu

role="${1:-api}"
if [ "$#" -gt 0 ]; then shift; fi

case "$role" in
    api)
        visiontune migrate
        exec visiontune serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
        ;;
    worker)
        exec visiontune worker "$@"
        ;;
    background)
        exec visiontune worker --background "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
