//! What callers do with instances besides streaming their SVIDs: start,
//! end and list tasks, and revoke. The agent's own calls (over the workload
//! socket) attest the caller first and act on its instance only; the
//! operator's calls (the admin API, later) name any live instance.

use super::instance::{self, Command};
use super::{BeginTask, Error, IdentityManager, TaskInfo, audit};
use crate::attest::PeerCred;
use crate::ids::InstanceId;
use crate::policy::Requester;

impl IdentityManager {
    /// Starts a task for the calling process (the workload socket's Tasks
    /// service): the entry's `tasks.self_declare` must allow it.
    ///
    /// # Errors
    /// As [`IdentityManager::subscribe`], plus [`Error::Task`].
    pub async fn begin_own_task(&self, peer: PeerCred, req: BeginTask) -> Result<TaskInfo, Error> {
        let (_, commands) = self.instance_for(peer).await?;
        let actor = audit::peer_actor(&peer);
        instance::request(&commands, |reply| Command::Begin {
            req,
            requester: Requester::Agent,
            actor,
            reply,
        })
        .await
    }

    /// Ends one of the calling process's tasks.
    ///
    /// # Errors
    /// [`Error::UnknownTask`] when the caller has no such live task.
    pub async fn end_own_task(&self, peer: PeerCred, task_id: String) -> Result<TaskInfo, Error> {
        let (_, commands) = self.instance_for(peer).await?;
        let actor = audit::peer_actor(&peer);
        instance::request(&commands, |reply| Command::End {
            task_id,
            actor,
            reply,
        })
        .await
    }

    /// The calling process's live tasks.
    ///
    /// # Errors
    /// As [`IdentityManager::subscribe`].
    pub async fn list_own_tasks(&self, peer: PeerCred) -> Result<Vec<TaskInfo>, Error> {
        let (_, commands) = self.instance_for(peer).await?;
        instance::request(&commands, |reply| Command::List { reply }).await
    }

    /// Starts a task for any live instance: the orchestrator path (admin API).
    ///
    /// # Errors
    /// [`Error::UnknownInstance`], [`Error::Task`], or issuing errors.
    pub async fn begin_task(
        &self,
        instance: &InstanceId,
        req: BeginTask,
        actor: String,
    ) -> Result<TaskInfo, Error> {
        let commands = self.commands_of(instance)?;
        instance::request(&commands, |reply| Command::Begin {
            req,
            requester: Requester::Operator,
            actor,
            reply,
        })
        .await
    }

    /// Ends a task of any live instance: the orchestrator path.
    ///
    /// # Errors
    /// [`Error::UnknownInstance`] or [`Error::UnknownTask`].
    pub async fn end_task(
        &self,
        instance: &InstanceId,
        task_id: String,
        actor: String,
    ) -> Result<TaskInfo, Error> {
        let commands = self.commands_of(instance)?;
        instance::request(&commands, |reply| Command::End {
            task_id,
            actor,
            reply,
        })
        .await
    }

    /// The live tasks of any live instance.
    ///
    /// # Errors
    /// [`Error::UnknownInstance`].
    pub async fn list_tasks(&self, instance: &InstanceId) -> Result<Vec<TaskInfo>, Error> {
        let commands = self.commands_of(instance)?;
        instance::request(&commands, |reply| Command::List { reply }).await
    }

    /// Revokes a live instance: its tasks end, its SVIDs are revoked, and its
    /// streams end with PermissionDenied.
    ///
    /// # Errors
    /// [`Error::UnknownInstance`].
    pub async fn revoke_instance(&self, instance: &InstanceId, actor: String) -> Result<(), Error> {
        let commands = self.commands_of(instance)?;
        instance::request(&commands, |reply| Command::Revoke { actor, reply }).await
    }
}
