// Reads a JSON array of Kubernetes objects on stdin and prints, as JSON, the validation errors of each one
// against its CRD schema ({kind, name, errors: [...]}; an object of a kind without a validator here: errors null).
import { Cluster } from "@kubernetes-models/cloudnative-pg/postgresql.cnpg.io/v1/Cluster";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "postgresql.cnpg.io/v1/Cluster": Cluster,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((obj) => {
  const Model = MODELS[`${obj.apiVersion}/${obj.kind}`];
  if (Model === undefined) return { kind: obj.kind, name: obj.metadata?.name, errors: null };
  try {
    new Model(obj).validate();
    return { kind: obj.kind, name: obj.metadata.name, errors: [] };
  } catch (e) {
    return { kind: obj.kind, name: obj.metadata?.name, errors: [e.message] };
  }
});
process.stdout.write(JSON.stringify(results));
