FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir -e .
CMD ["python", "-m", "medsim.embed_worker", "--model", "current"]
