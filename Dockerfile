FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir .
# a plain (not editable) install: the schema ships in the package, so `medsim migrate` works
CMD ["medsim", "worker", "--model", "current"]
