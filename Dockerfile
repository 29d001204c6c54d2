# reverie with the shared-queue extra, CPU build of PyTorch (compose.yaml builds this for front ends and workers).
FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e ".[postgres]" -c constraints.txt
ENTRYPOINT ["reverie"]
