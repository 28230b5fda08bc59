//! The CRI client: containerd's `runtime.v1` RuntimeService and ImageService over its unix
//! socket. A thin wrapper: every decision is made elsewhere (`reconcile`); this only turns the
//! CRI's answers into [`Observed`] and carries out actions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::reconcile::{ContainerSeen, ContainerState, SandboxSeen};

/// The CRI's generated types and clients (`runtime.v1`, from `proto/api.proto`).
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    unused_qualifications
)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::image_service_client::ImageServiceClient;
use api::runtime_service_client::RuntimeServiceClient;

/// Label on every sandbox and container edged creates: the pod's uid (kubelet's label).
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
/// Label: the pod's name.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
/// Label: the pod's namespace.
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
/// Label on containers: the container's name in the pod spec.
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// A CRI call that failed: which call and the runtime's message.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// The socket could not be reached.
    #[error("cannot reach the container runtime at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A call the runtime answered with an error.
    #[error("{call}: {message}")]
    Call {
        /// The CRI method.
        call: &'static str,
        /// The runtime's message (what users see in a pod's status).
        message: String,
    },
}

fn call(name: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |s| CriError::Call {
        call: name,
        message: s.message().to_owned(),
    }
}

/// A connection to the runtime's CRI socket (cheap to clone: one HTTP/2 channel).
#[derive(Debug, Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the CRI socket at `path` (containerd's `grpc.address`).
    pub async fn connect(path: &Path) -> Result<Self, CriError> {
        let socket = path.to_owned();
        // The URI is a placeholder: the connector dials the unix socket.
        let channel =
            Endpoint::from_static("http://cri.local")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await
                .map_err(|source| CriError::Connect {
                    path: path.to_owned(),
                    source,
                })?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The runtime's name and version, e.g. `containerd://1.6.20`.
    pub async fn version(&mut self) -> Result<String, CriError> {
        let v = self
            .runtime
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(call("Version"))?
            .into_inner();
        Ok(format!("{}://{}", v.runtime_name, v.runtime_version))
    }

    /// Every sandbox edged made (labelled with a pod uid), newest first.
    pub async fn sandboxes(&mut self) -> Result<Vec<SandboxSeen>, CriError> {
        let items = self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(call("ListPodSandbox"))?
            .into_inner()
            .items;
        let mut seen: Vec<SandboxSeen> = items
            .into_iter()
            .filter_map(|s| {
                let uid = s.labels.get(LABEL_POD_UID)?.clone();
                Some(SandboxSeen {
                    id: s.id,
                    pod_uid: uid,
                    attempt: s.metadata.map_or(0, |m| m.attempt),
                    ready: s.state == api::PodSandboxState::SandboxReady as i32,
                    created_at: s.created_at,
                })
            })
            .collect();
        seen.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        Ok(seen)
    }

    /// Every container edged made, with its status (exit code, times, reason).
    pub async fn containers(&mut self) -> Result<Vec<ContainerSeen>, CriError> {
        let list = self
            .runtime
            .list_containers(api::ListContainersRequest { filter: None })
            .await
            .map_err(call("ListContainers"))?
            .into_inner()
            .containers;
        let mut seen = Vec::with_capacity(list.len());
        for c in list {
            let (Some(uid), Some(name)) = (
                c.labels.get(LABEL_POD_UID).cloned(),
                c.labels.get(LABEL_CONTAINER_NAME).cloned(),
            ) else {
                continue;
            };
            let status = match self
                .runtime
                .container_status(api::ContainerStatusRequest {
                    container_id: c.id.clone(),
                    verbose: false,
                })
                .await
            {
                Ok(s) => s.into_inner().status,
                // Removed between the list and the status call.
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(call("ContainerStatus")(s)),
            };
            let Some(s) = status else { continue };
            seen.push(ContainerSeen {
                id: c.id,
                pod_uid: uid,
                sandbox_id: c.pod_sandbox_id,
                name,
                attempt: s.metadata.map_or(0, |m| m.attempt),
                state: match api::ContainerState::try_from(s.state) {
                    Ok(api::ContainerState::ContainerCreated) => ContainerState::Created,
                    Ok(api::ContainerState::ContainerRunning) => ContainerState::Running,
                    Ok(api::ContainerState::ContainerExited) => ContainerState::Exited,
                    _ => ContainerState::Unknown,
                },
                exit_code: s.exit_code,
                created_at: s.created_at,
                started_at: s.started_at,
                finished_at: s.finished_at,
                reason: s.reason,
                message: s.message,
                image: s.image.map(|i| i.image).unwrap_or_default(),
                image_ref: s.image_ref,
            });
        }
        Ok(seen)
    }

    /// Whether `image` is present.
    pub async fn has_image(&mut self, image: &str) -> Result<bool, CriError> {
        let answer = self
            .images
            .image_status(api::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .map_err(call("ImageStatus"))?
            .into_inner();
        Ok(answer.image.is_some())
    }

    /// Pulls `image` (from a registry, through the runtime); its reference on success.
    pub async fn pull_image(&mut self, image: &str) -> Result<String, CriError> {
        Ok(self
            .images
            .pull_image(api::PullImageRequest {
                image: Some(image_spec(image)),
                auth: None,
                sandbox_config: None,
            })
            .await
            .map_err(call("PullImage"))?
            .into_inner()
            .image_ref)
    }

    /// Removes `image`.
    pub async fn remove_image(&mut self, image: &str) -> Result<(), CriError> {
        self.images
            .remove_image(api::RemoveImageRequest {
                image: Some(image_spec(image)),
            })
            .await
            .map_err(call("RemoveImage"))?;
        Ok(())
    }

    /// Runs a sandbox; its id.
    pub async fn run_sandbox(&mut self, config: api::PodSandboxConfig) -> Result<String, CriError> {
        Ok(self
            .runtime
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(call("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// The sandbox's pod IP (empty with host network).
    pub async fn sandbox_ip(&mut self, id: &str) -> Result<String, CriError> {
        let status = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(call("PodSandboxStatus"))?
            .into_inner()
            .status;
        Ok(status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    /// Stops a sandbox (its containers are killed).
    pub async fn stop_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        self.runtime
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await
            .map_err(call("StopPodSandbox"))?;
        Ok(())
    }

    /// Removes a stopped sandbox.
    pub async fn remove_sandbox(&mut self, id: &str) -> Result<(), CriError> {
        self.runtime
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            })
            .await
            .map_err(call("RemovePodSandbox"))?;
        Ok(())
    }

    /// Creates a container in a sandbox and starts it; its id.
    pub async fn create_and_start(
        &mut self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let id = self
            .runtime
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(call("CreateContainer"))?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(call("StartContainer"))?;
        Ok(id)
    }

    /// Stops a container: SIGTERM, SIGKILL after `grace_secs`.
    pub async fn stop_container(&mut self, id: &str, grace_secs: i64) -> Result<(), CriError> {
        self.runtime
            .stop_container(api::StopContainerRequest {
                container_id: id.to_owned(),
                timeout: grace_secs,
            })
            .await
            .map_err(call("StopContainer"))?;
        Ok(())
    }

    /// Removes a container.
    pub async fn remove_container(&mut self, id: &str) -> Result<(), CriError> {
        self.runtime
            .remove_container(api::RemoveContainerRequest {
                container_id: id.to_owned(),
            })
            .await
            .map_err(call("RemoveContainer"))?;
        Ok(())
    }

    /// Runs `cmd` in a running container; its exit code and output (an exec probe).
    pub async fn exec_sync(
        &mut self,
        id: &str,
        cmd: Vec<String>,
        timeout_secs: i64,
    ) -> Result<(i32, Vec<u8>), CriError> {
        let r = self
            .runtime
            .exec_sync(api::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd,
                timeout: timeout_secs,
            })
            .await
            .map_err(call("ExecSync"))?
            .into_inner();
        let mut out = r.stdout;
        out.extend_from_slice(&r.stderr);
        Ok((r.exit_code, out))
    }

    /// The images the runtime holds: (id, tags, size).
    pub async fn images(&mut self) -> Result<Vec<(String, Vec<String>, u64)>, CriError> {
        Ok(self
            .images
            .list_images(api::ListImagesRequest { filter: None })
            .await
            .map_err(call("ListImages"))?
            .into_inner()
            .images
            .into_iter()
            .map(|i| (i.id, i.repo_tags, i.size))
            .collect())
    }
}

fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.to_owned(),
        annotations: HashMap::new(),
        ..Default::default()
    }
}
