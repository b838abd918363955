#!/usr/bin/env bash
# Installs forgeml on a throw-away kind cluster and checks it end to end: the KubeRay
# operator, the chart, a training RayJob, and a prediction from the RayService.
# Needs docker, kind, kubectl and helm; takes 15-30 minutes. Not run in CI (no
# Kubernetes there); run it before a release.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-forgeml-e2e}
IMAGE=forgeml:e2e
STORE=s3://forgeml/e2e

kind create cluster --name "$CLUSTER"
trap 'kind delete cluster --name "$CLUSTER"' EXIT
docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

helm repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 --wait

# An S3 server inside the cluster for the storage root.
kubectl create deployment minio --image=quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z \
  -- minio server /data
kubectl expose deployment minio --port 9000
kubectl rollout status deployment/minio --timeout=300s
kubectl create secret generic forgeml-s3 --from-literal=AWS_ACCESS_KEY_ID=minioadmin \
  --from-literal=AWS_SECRET_ACCESS_KEY=minioadmin
kubectl run make-bucket --rm -i --restart=Never --image=amazon/aws-cli:2.27.0 \
  --env AWS_ACCESS_KEY_ID=minioadmin --env AWS_SECRET_ACCESS_KEY=minioadmin \
  -- --endpoint-url http://minio:9000 s3 mb s3://forgeml
kubectl create secret generic forgeml-ray-token --from-literal=auth_token="$(openssl rand -hex 32)"
SERVE_TOKEN=$(openssl rand -hex 16)
kubectl create secret generic forgeml-serve-token --from-literal=token="$SERVE_TOKEN"

cat > /tmp/forgeml-e2e-values.yaml <<VALUES
image: {repository: forgeml, tag: e2e, pullPolicy: Never}
s3: {endpointUrl: http://minio:9000, region: us-east-1, credentialsSecret: forgeml-s3}
head: {resources: {requests: {cpu: 500m, memory: 2Gi}, limits: {cpu: "1", memory: 3Gi}}}
workers:
  cpu: {replicas: 1, minReplicas: 0, maxReplicas: 2,
        resources: {requests: {cpu: "1", memory: 3Gi}, limits: {cpu: "2", memory: 3Gi}}}
job:
  enabled: true
  experiment:
    name: wafer-cnn
    storage: {root: $STORE}
    data: {source: {kind: wafer, samples_per_class: 60, image_size: 16}}
    train: {max_epochs: 2}
VALUES
helm install forge helm/forgeml -f /tmp/forgeml-e2e-values.yaml --wait
kubectl wait rayjob/forge-forgeml-job --for=jsonpath='{.status.jobStatus}'=SUCCEEDED \
  --timeout=1200s

kubectl run serve-build --rm -i --restart=Never --image="$IMAGE" --image-pull-policy=Never \
  --env AWS_ENDPOINT_URL=http://minio:9000 --env AWS_ACCESS_KEY_ID=minioadmin \
  --env AWS_SECRET_ACCESS_KEY=minioadmin --env AWS_REGION=us-east-1 --quiet -- \
  forgeml serve build --model wafer-cnn --storage-root "$STORE" --host 0.0.0.0 > /tmp/serve.yaml
helm upgrade forge helm/forgeml -f /tmp/forgeml-e2e-values.yaml --set job.enabled=false \
  --set serving.enabled=true --set-file serving.serveConfigV2=/tmp/serve.yaml
kubectl wait rayservice/forge-forgeml-serve --for=condition=Ready --timeout=900s
kubectl port-forward svc/forge-forgeml-serve 18000:8000 &
sleep 3
python3 - "$SERVE_TOKEN" <<'PY'
import json, sys, urllib.request
request = urllib.request.Request(
    "http://127.0.0.1:18000/v1/models/wafer-cnn/predict",
    data=json.dumps({"instances": [{"image": [[1] * 16] * 16}]}).encode(),
    headers={"Authorization": f"Bearer {sys.argv[1]}", "Content-Type": "application/json"},
)
print(json.load(urllib.request.urlopen(request, timeout=60)))
PY
echo "forgeml on kind: OK"
