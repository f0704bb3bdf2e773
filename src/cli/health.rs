//! `pgstore health`: asks a server's gRPC health service whether it is serving.

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::client::{Connect, status_line};

/// Checks `service` ("" = the whole server). `Ok` with the status name when it is SERVING; `Err`
/// with a one-line reason otherwise (unreachable, timed out, not serving, unknown service).
pub async fn check(connect: &Connect, service: &str) -> Result<String, String> {
    let work = async {
        let channel = connect.channel().await?;
        let mut client = HealthClient::new(channel);
        let answer = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|s| format!("{}: {}", connect.uri(), status_line(&s)))?;
        let status = answer.into_inner().status();
        let name = status.as_str_name();
        let shown = if service.is_empty() {
            format!("{}: {name}", connect.uri())
        } else {
            format!("{} ({service}): {name}", connect.uri())
        };
        if status == ServingStatus::Serving {
            Ok(shown)
        } else {
            Err(shown)
        }
    };
    match tokio::time::timeout(connect.timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{}: no answer within {}",
            connect.uri(),
            humantime::format_duration(connect.timeout)
        )),
    }
}
