//! The KServe deployment files parse and hold what the server needs (no cluster involved):
//! readiness on /v2/health/ready, a termination grace period longer than the drain, the
//! container's port, and KEDA scaling on star_queue_size.

use star_tests::root;

fn load(file: &str) -> serde_yaml::Value {
    let p = root().join("deploy/kserve").join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn flag(args: &[serde_yaml::Value], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a.as_str() == Some(name))?;
    args.get(i + 1)?.as_str()?.parse().ok()
}

#[test]
fn inference_service_probes_ports_and_grace_period() {
    let isvc = load("inferenceservice.yaml");
    assert_eq!(
        isvc["apiVersion"].as_str(),
        Some("serving.kserve.io/v1beta1")
    );
    assert_eq!(isvc["kind"].as_str(), Some("InferenceService"));
    let pred = &isvc["spec"]["predictor"];
    let c = &pred["containers"][0];
    assert!(c["image"].as_str().is_some());
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/v2/health/ready")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/v2/health/live")
    );
    assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(8080));
    let args = c["args"].as_sequence().expect("args");
    let drain = flag(args, "--drain-s").expect("--drain-s in args");
    let grace = pred["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        grace > drain,
        "grace {grace} s must exceed the drain {drain} s"
    );
    assert!(c["resources"]["limits"]["memory"].as_str().is_some());
}

#[test]
fn keda_scales_on_the_queue_size_and_the_dockerfile_serves() {
    let so = load("keda-scaledobject.yaml");
    assert_eq!(so["apiVersion"].as_str(), Some("keda.sh/v1alpha1"));
    assert_eq!(so["kind"].as_str(), Some("ScaledObject"));
    assert!(so["spec"]["scaleTargetRef"]["name"].as_str().is_some());
    let t = &so["spec"]["triggers"][0];
    assert_eq!(t["type"].as_str(), Some("prometheus"));
    assert!(t["metadata"]["query"]
        .as_str()
        .unwrap()
        .contains("star_queue_size"));
    assert!(t["metadata"]["threshold"].as_str().is_some());
    let docker = std::fs::read_to_string(root().join("deploy/kserve/Dockerfile")).unwrap();
    assert!(docker.contains(r#"ENTRYPOINT ["star-run", "serve""#));
    assert!(docker.contains("ORT_DYLIB_PATH="));
    assert!(docker.contains("EXPOSE 8080"));
}
